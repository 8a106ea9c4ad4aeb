"""Device mesh and logical-axis sharding.

Models name axes only logically (`layers/axes.py`); `config.sharding_rules` maps them to
the mesh axes `data`, `fsdp`, `tensor`. Parameters are created directly in their
sharded layout: shapes come from `jax.eval_shape`, shardings from the rules, and `init` is
jitted with those `out_shardings`, so a large model never sits on one device.

A dimension that the mesh axis does not divide (a 1-head tower on a tensor axis of 2, a
2-way ITM head) is replicated on that axis instead of padded; `param_shardings` reports
these so that tests and logs can show them.

Parameters that exist on the host (a converted checkpoint, an exported params/ directory)
reach the mesh through one function, `place`: each process builds only its own shards.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mplug2_jax import config_lib


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """The device mesh. With a `dcn` axis and devices on several TPU slices, the `dcn` axis
  runs across slices and the others within each (`create_hybrid_device_mesh`); elsewhere
  (one slice, fake CPU devices for the plan tool) it is an ordinary mesh axis."""
  devices = jax.devices() if devices is None else devices
  shape = config_lib.mesh_shape(config, len(devices))
  axes = tuple(config.mesh.axes)
  slices = {getattr(d, "slice_index", 0) for d in devices}
  if config_lib.DCN_AXIS in axes and len(slices) > 1:
    from jax.experimental import mesh_utils

    i = axes.index(config_lib.DCN_AXIS)
    if shape[i] != len(slices):
      raise config_lib.ConfigError("mesh.shape", tuple(config.mesh.shape),
                                   f"the dcn axis is {shape[i]} but the devices are on "
                                   f"{len(slices)} slices")
    ici = tuple(1 if j == i else s for j, s in enumerate(shape))
    dcn = tuple(s if j == i else 1 for j, s in enumerate(shape))
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    return Mesh(grid, axes, axis_types=(AxisType.Auto,) * len(axes))
  return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  return config_lib.effective_rules(config)


@contextlib.contextmanager
def activate(mesh: Mesh, config: ml_collections.ConfigDict):
  """Mesh + logical rules context for tracing sharded model code."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules(config)):
    yield


def batch_sharding(mesh: Mesh, config: ml_collections.ConfigDict) -> NamedSharding:
  """Sharding of a batch: dim 0 over the mesh axes of the `activation_batch` rule."""
  axes = dict(rules(config))["activation_batch"]
  return NamedSharding(mesh, P(axes))


def batch_ways(mesh: Mesh, config: ml_collections.ConfigDict) -> int:
  """Into how many slices `batch_sharding` splits a batch."""
  axes = dict(rules(config))["activation_batch"]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return int(np.prod([mesh.shape[a] for a in axes]))


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> tuple[P, list[int]]:
  """Drops mesh axes that do not divide their dimension; returns the dims replicated."""
  fitted, dropped = [], []
  for dim, (size, entry) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if axes and size % ways:
      fitted.append(None)
      dropped.append(dim)
    else:
      fitted.append(entry)
  return P(*fitted), dropped


def logical_shardings(abstract_tree: Any, mesh: Mesh, config: ml_collections.ConfigDict,
                      report: list | None = None) -> Any:
  """NamedShardings for a tree of (possibly boxed) abstract arrays by the rules."""
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, rules(config))
  values = unboxed(abstract_tree)

  def one(path, spec, value):
    spec, dropped = _fit_spec(spec if spec is not None else P(), value.shape, mesh)
    if dropped and report is not None:
      report.append((jax.tree_util.keystr(path), value.shape, dropped))
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(
      one, mesh_specs, values, is_leaf=lambda x: isinstance(x, P) or x is None)


def init_params(model: nn.Module, batch: dict, rng: jax.Array, mesh: Mesh,
                config: ml_collections.ConfigDict, method: Callable | None = None):
  """Sharded parameter init: eval_shape -> shardings from rules -> jit(init, out_shardings)."""
  def init(rng, batch):
    variables = model.init({"params": rng, "dropout": rng}, batch, method=method)
    return variables["params"]

  with activate(mesh, config):
    abstract = jax.eval_shape(init, rng, batch)
    shardings = logical_shardings(abstract, mesh, config)
    params = jax.jit(lambda r, b: nn.meta.unbox(init(r, b)), out_shardings=shardings)(rng, batch)
  return params, shardings


def param_shardings(model: nn.Module, batch: dict, mesh: Mesh,
                    config: ml_collections.ConfigDict, report: list | None = None) -> Any:
  """NamedShardings of `model`'s parameters by the logical rules (no allocation)."""
  with activate(mesh, config):
    return logical_shardings(abstract_params(model, batch), mesh, config, report)


def place(tree: Any, shardings: Any) -> Any:
  """Host (or differently placed) arrays -> global arrays with the matching sharding of
  `shardings` (a tree of NamedShardings, matched by path); leaves without one are
  replicated on the shardings' mesh, leaves already on that sharding are kept."""
  targets = flat(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  mesh = next(iter(targets.values())).mesh
  replicated = NamedSharding(mesh, P())

  def one(path, x):
    target = targets.get(path_str(path), replicated)
    if isinstance(x, jax.Array) and x.sharding == target:
      return x
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, target, lambda index: value[index])

  return jax.tree_util.tree_map_with_path(one, tree)


def path_str(path) -> str:
  """'vision/blocks/attn/key/kernel' for a tree_util key path."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return "/".join(parts)


def flat(tree: Any, is_leaf: Callable | None = None) -> dict[str, Any]:
  """{'a/b/c': leaf} of a nested tree."""
  return {path_str(p): v for p, v in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def abstract_params(model: nn.Module, batch: dict, method: Callable | None = None) -> Any:
  """Parameter shapes without allocating (boxed with their logical axes)."""
  def init(b):
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(0)}
    return model.init(rngs, b, method=method)["params"]

  return jax.eval_shape(init, batch)


def unboxed(tree: Any) -> Any:
  """The values of a tree of boxed (logically partitioned) leaves, without constraints."""
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def count_params(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(unboxed(tree)))
