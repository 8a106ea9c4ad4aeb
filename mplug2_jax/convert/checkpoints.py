"""Reading and writing official checkpoint files: PyTorch `.pth`/`.bin` and safetensors.

Official files are read lazily, tensor by tensor (`safe_open` for safetensors, a
memory-mapped `torch.load` for `.pth`/`.bin`), so converting the 1.5B-parameter large
checkpoint holds one converted copy of the used weights plus a few tensors in flight,
never two fp32 copies plus a torch copy. torch is imported only for `.pth`/`.bin`.
The exported-parameters directory (orbax) is `param_store.py`.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Iterator

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


def _torch_to_numpy(tensor) -> np.ndarray:
  import torch
  if tensor.dtype == torch.bfloat16:
    tensor = tensor.float()
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
