"""Reading and writing official checkpoint files: PyTorch `.pth`/`.bin` and safetensors,
single files or HF sharded directories.

Official files are read lazily, tensor by tensor (`safe_open` for safetensors, a
memory-mapped `torch.load` for `.pth`/`.bin`), so converting the 1.5B-parameter large
checkpoint holds one converted copy of the used weights plus a few tensors in flight,
never two fp32 copies plus a torch copy. torch is imported only for `.pth`/`.bin`.
`open_state_dict` also reads an HF directory (`model.safetensors.index.json` or
`pytorch_model.bin.index.json` with its shards, or one `model.safetensors` /
`pytorch_model.bin`); `write_sharded` writes one shard at a time from a stream of
tensors, with the index. The exported-parameters directory (orbax) is `param_store.py`.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Mapping
from typing import Callable, Iterator

import numpy as np


class LazyStateDict(Mapping):
  """Read-only {key: np.ndarray} over a checkpoint file, loading a tensor when asked."""

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)
    if not self.path.exists():
      raise FileNotFoundError(f"checkpoint {self.path} does not exist")
    suffix = self.path.suffix
    if suffix == ".safetensors":
      from safetensors import safe_open
      self._file = safe_open(str(self.path), framework="np")
      self._keys = list(self._file.keys())
      self._get = self._file.get_tensor
    elif suffix in (".pth", ".bin", ".pt"):
      try:
        import torch
      except ImportError as e:
        raise ImportError(f"reading {self.path.name} needs torch: pip install "
                          f"'mplug2_jax[torch]' (safetensors files need no torch)") from e
      state = torch.load(str(self.path), map_location="cpu", mmap=True, weights_only=True)
      if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # the official training scripts save {"model": ..., ...}
      if not isinstance(state, dict):
        raise ValueError(f"{self.path}: expected a state dict (or one under 'model'), got "
                         f"{type(state).__name__}")
      self._state = state
      self._keys = list(state)
      self._get = lambda k: _torch_to_numpy(self._state[k])
    else:
      raise ValueError(f"{self.path}: unknown checkpoint format {suffix!r} "
                       f"(.safetensors, .pth, .bin)")

  def __getitem__(self, key: str) -> np.ndarray:
    if key not in self._keys_set:
      raise KeyError(key)
    return self._get(key)

  @property
  def _keys_set(self) -> set[str]:
    if not hasattr(self, "_keys_cache"):
      self._keys_cache = set(self._keys)
    return self._keys_cache

  def __iter__(self) -> Iterator[str]:
    return iter(self._keys)

  def __len__(self) -> int:
    return len(self._keys)

  def shape(self, key: str) -> tuple[int, ...]:
    if hasattr(self, "_file"):
      return tuple(self._file.get_slice(key).get_shape())
    return tuple(self._state[key].shape)

  @property
  def directory(self) -> pathlib.Path:
    return self.path.parent


INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


class ShardedStateDict(Mapping):
  """Read-only {key: np.ndarray} over an HF sharded checkpoint (its index's weight map);
  each shard is opened lazily when one of its tensors is asked for."""

  def __init__(self, index_path: str | pathlib.Path):
    self.path = pathlib.Path(index_path)
    try:
      index = json.loads(self.path.read_text())
      self._where = dict(index["weight_map"])
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{self.path}: not an HF checkpoint index ({e})") from None
    self._shards: dict[str, LazyStateDict] = {}
    for name in sorted(set(self._where.values())):
      if not (self.directory / name).exists():
        raise FileNotFoundError(f"{self.path} names shard {name}, which does not exist")

  @property
  def directory(self) -> pathlib.Path:
    return self.path.parent

  def _shard(self, key: str) -> LazyStateDict:
    name = self._where[key]
    if name not in self._shards:
      self._shards[name] = LazyStateDict(self.directory / name)
    return self._shards[name]

  def __getitem__(self, key: str) -> np.ndarray:
    if key not in self._where:
      raise KeyError(key)
    return self._shard(key)[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._shard(key).shape(key)


def open_state_dict(path: str | pathlib.Path) -> Mapping:
  """A lazy state dict of a checkpoint file, an HF index file or an HF directory."""
  path = pathlib.Path(path)
  if path.is_dir():
    for name in INDEX_FILES:
      if (path / name).exists():
        return ShardedStateDict(path / name)
    for name in SINGLE_FILES:
      if (path / name).exists():
        return LazyStateDict(path / name)
    raise FileNotFoundError(f"{path}: no {' / '.join(INDEX_FILES + SINGLE_FILES)} in this "
                            "directory")
  if path.name.endswith(".index.json"):
    return ShardedStateDict(path)
  return LazyStateDict(path)


def _torch_to_numpy(tensor) -> np.ndarray:
  """The tensor's values in its own dtype (bfloat16 as ml_dtypes' bfloat16, bit for bit)."""
  import torch
  if tensor.dtype == torch.bfloat16:
    import ml_dtypes
    return tensor.detach().contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.detach().numpy()


def write_state_dict(state: dict[str, np.ndarray], path: str | pathlib.Path) -> None:
  """Official-layout tensors -> .safetensors (no torch needed) or .pth."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.suffix == ".safetensors":
    from safetensors.numpy import save_file
    save_file({k: np.asarray(v, order="C") for k, v in state.items()}, str(path))
  elif path.suffix in (".pth", ".bin", ".pt"):
    import torch
    torch.save({k: torch.from_numpy(np.asarray(v, order="C")) for k, v in state.items()}, str(path))
  else:
    raise ValueError(f"{path}: write .safetensors or .pth")


def write_sharded(tensors: Iterable[tuple[str, np.ndarray]], directory: str | pathlib.Path,
                  shard_of: Callable[[str], int], num_shards: int,
                  metadata: dict[str, str] | None = None) -> dict[str, str]:
  """Streams (key, array) pairs into HF safetensors shards `model-0000i-of-0000n` plus
  `model.safetensors.index.json`; returns the weight map. Keys must arrive grouped by
  shard (`shard_of`, 0-based, non-decreasing); each shard is written as soon as the next
  one starts, so only one shard is held in memory."""
  from safetensors.numpy import save_file

  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  name = lambda i: f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
  weight_map: dict[str, str] = {}
  total = 0
  current, held = -1, {}

  def flush():
    if held:
      save_file(held, str(directory / name(current)), metadata=metadata or {"format": "pt"})
      held.clear()

  for key, value in tensors:
    shard = shard_of(key)
    if shard < current or not 0 <= shard < num_shards:
      raise ValueError(f"tensor {key!r} belongs to shard {shard}, after shard {current} "
                       f"(of {num_shards}): keys must arrive grouped by shard")
    if shard != current:
      flush()
      current = shard
    held[key] = np.ascontiguousarray(value)
    weight_map[key] = name(shard)
    total += held[key].nbytes
  flush()
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  (directory / INDEX_FILES[0]).write_text(json.dumps(index, indent=2) + "\n")
  return weight_map
