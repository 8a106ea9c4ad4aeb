"""The exported-parameters directory: `params/` (an orbax checkpoint of the parameter
tree) and `model_config.json` (the `config.model` that built it).

Written by a finished training run (its workdir), by `python -m mplug2_jax.convert
import-official | init-pretrained`; read by `init_checkpoint=`, the evaluate CLI and the
exporters. Paths may be local or `gs://` (etils.epath).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

PARAMS_DIR = "params"
MODEL_CONFIG_FILE = "model_config.json"


def resolve(directory) -> epath.Path:
  """An absolute path (orbax requires one); URLs such as gs:// stay as they are."""
  path = epath.Path(directory)
  return path if "://" in str(directory) else epath.Path(path.resolve())


def nest(flat: dict[str, Any]) -> dict:
  """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': {'c': x}}} -> {'a/b/c': x}."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, path + "/"))
    else:
      out[path] = value
  return out


def nonfinite_leaves(params: Mapping) -> list[str]:
  """Paths ('a/b/c') of the floating-point leaves holding a NaN or an infinity (host or
  sharded arrays; every process must call it). Host arrays are checked in place, slice by
  slice: a device copy of a 7B import would double its memory."""
  import jax.numpy as jnp

  flat = {k: v for k, v in flatten(params).items() if jnp.issubdtype(jnp.result_type(v),
                                                                      jnp.inexact)}
  bad = [k for k, v in flat.items() if isinstance(v, np.ndarray) and count_nonfinite(v)]
  on_device = {k: v for k, v in flat.items() if not isinstance(v, np.ndarray)}
  if on_device:
    checks = jax.jit(lambda t: {k: jnp.all(jnp.isfinite(v)) for k, v in t.items()})(on_device)
    bad += [k for k, ok in jax.device_get(checks).items() if not bool(ok)]
  return sorted(bad)


def count_nonfinite(value: np.ndarray, chunk: int = 1 << 24) -> int:
  """NaNs and infinities in a host array, counted over float32 slices of `chunk` elements
  (no full-size copy of a stacked 7B leaf)."""
  flat = value.reshape(-1)
  return sum(int((~np.isfinite(flat[i:i + chunk].astype(np.float32))).sum())
             for i in range(0, flat.size, chunk))


def check_shapes(flat: Mapping[str, Any], expected: Mapping[str, Any], where) -> None:
  """Raises ValueError naming the parameters of `flat` ({path: array}) that are missing,
  extra or of another shape than `expected` ({path: ShapeDtypeStruct}), e.g. a checkpoint
  of another model size than its model_config.json says."""
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  shapes = sorted(k for k in set(flat) & set(expected)
                  if tuple(np.shape(flat[k])) != tuple(expected[k].shape))
  if not (missing or extra or shapes):
    return
  parts = [f"{k}: {tuple(np.shape(flat[k]))} vs the model's {tuple(expected[k].shape)}"
           for k in shapes[:3]]
  parts += [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in extra[:3]]
  raise ValueError(f"{where}: the parameters do not fit the model of its config "
                   f"({len(shapes)} shapes differ, {len(missing)} missing, {len(extra)} "
                   f"unexpected): " + "; ".join(parts))


def save_params(directory, params: dict, model_config: ml_collections.ConfigDict) -> epath.Path:
  """Parameters as an orbax checkpoint plus the model config that built them. Every
  process takes part (sharded arrays); process 0 writes the config."""
  import orbax.checkpoint as ocp

  directory = resolve(directory)
  bad = nonfinite_leaves(params)
  if bad:
    raise ValueError(f"refusing to write {directory / PARAMS_DIR}: non-finite values in "
                     f"{len(bad)} parameters, e.g. {', '.join(bad[:3])}")
  directory.mkdir(parents=True, exist_ok=True)
  # Synchronous and uncompressed: orbax's compressing save holds about two more copies of
  # the arrays while it writes (a 7B import would need ~3x its size of host memory);
  # parameters hardly compress. Host arrays are written without orbax's safety copy:
  # the save is synchronous, so nothing changes them meanwhile. Readable by `load_params`
  # like any orbax pytree.
  th = ocp.type_handlers
  handlers = th.create_type_handler_registry(
      *[(t, th.get_type_handler(t)) for t in (int, float, np.number, jax.Array)],
      (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)))
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
      use_compression=False, type_handler_registry=handlers))
  checkpointer.save(directory / PARAMS_DIR, args=ocp.args.PyTreeSave(params), force=True)
  checkpointer.close()
  if jax.process_index() == 0:
    (directory / MODEL_CONFIG_FILE).write_text(model_config.to_json(indent=2))
  return directory


def load_model_config(directory) -> ml_collections.ConfigDict:
  path = epath.Path(directory) / MODEL_CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing: not a parameters directory written by "
                            "mplug2_jax (a finished run's workdir or `convert` output)")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_params(directory) -> dict:
  """The parameter tree as host numpy arrays."""
  import orbax.checkpoint as ocp

  directory = resolve(directory)
  if not (directory / PARAMS_DIR).exists():
    raise FileNotFoundError(f"{directory / PARAMS_DIR} is missing: not a parameters directory "
                            "written by mplug2_jax")
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(directory / PARAMS_DIR).item_metadata
    # numpy targets restore onto the host, not onto an accelerator.
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), metadata)
    return checkpointer.restore(directory / PARAMS_DIR, target)
