"""The low-level config toolkit: errors, argument parsing, mesh shapes, the rules table.

Every module that reads a config section defines that section's defaults beside the code
that reads it (`data.default_data_config`, `train.default_train_config`, ...), each
model family its size presets (`models/<family>/config.py`); `experiment.base_config`
assembles them and `experiment.validate` checks a whole config before any compute. This
module sits below all of them: it imports nothing of the package but the layer axis names.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Iterable, Sequence

import ml_collections

from mplug2_jax.layers import axes

_UNSET = object()


class ConfigError(ValueError):
  """A bad config value. `str()` is one line that starts with the full key:
  `config.model.size='huge': must be one of ('tiny', 'base', 'large')`.

  Also constructible from one message (ml_collections re-raises errors from `get_config`
  as `type(e)(message)`)."""

  def __init__(self, key: str, value: Any = _UNSET, problem: str = ""):
    if value is _UNSET:
      self.key = ""
      super().__init__(key)
    else:
      self.key = key
      super().__init__(f"config.{key}={value!r}: {problem}")


class LaunchError(RuntimeError):
  """A bad launch (processes, devices, coordinator) found before any compute; `str()` is
  one line naming what is wrong. Entry points print it like a ConfigError."""


def check(ok: bool, key: str, value: Any, problem: str) -> None:
  if not ok:
    raise ConfigError(key, value, problem)


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
  """' (did you mean 'x'?)' for the closest candidate, or ''."""
  close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`get_config` argument: "large" or "large,task=caption" or "size=base,data=/d".

  A bare first token sets `size`; `key=value` pairs are typed by the defaults and an
  unknown key raises, naming it.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for i, token in enumerate(t.strip() for t in (arg or "").split(",") if t.strip()):
    key, sep, value = token.partition("=")
    if not sep:
      if i != 0 or "size" not in defaults:
        raise ConfigError("arg", arg, f"bare token {token!r}: use key=value")
      key, value = "size", token
    if key not in defaults:
      raise ConfigError("arg", arg, f"unknown key {key!r}{did_you_mean(key, defaults)}; "
                        f"known: {sorted(defaults)}")
    default = defaults[key]
    try:
      if isinstance(default, bool):
        parsed[key] = value.lower() in ("1", "true", "yes")
      else:
        parsed[key] = type(default)(value) if default is not None else value
    except ValueError:
      raise ConfigError(f"arg.{key}", value,
                        f"not a {type(default).__name__}") from None
  return parsed


def steps_for_epochs(epochs: float, examples_per_epoch: int, batch_size: int) -> tuple[int, int]:
  """(total steps, steps per epoch) of `epochs` passes over `examples_per_epoch` examples
  at `batch_size` examples per step (the last partial batch of an epoch counts)."""
  per_epoch = math.ceil(examples_per_epoch / batch_size)
  return int(round(epochs * per_epoch)), per_epoch


# --------------------------------------------------------------------------------------
# Mesh and the one logical-axis rules table.
# --------------------------------------------------------------------------------------

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes, or None = replicated), grouped by area.
DEFAULT_RULES = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # weights
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("modality", None),
    ("norm", None),
    ("position", None),
    ("latents", None),
    ("conv_time", None),
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    ("classes", None),
)


def mesh_config(shape=(1, -1, 1)) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      axes=MESH_AXES,
      shape=tuple(shape),  # one entry may be -1: all remaining devices
  ))


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """The concrete mesh shape (resolving one -1) for `num_devices`; validates it."""
  names, shape = tuple(config.mesh.axes), tuple(config.mesh.shape)
  check(len(names) == len(shape), "mesh.shape", shape,
        f"needs one size per axis of mesh.axes={names}")
  check(len(set(names)) == len(names), "mesh.axes", names, "axis names must be unique")
  check(all(s == -1 or (isinstance(s, int) and s > 0) for s in shape), "mesh.shape", shape,
        "sizes must be positive or -1")
  check(shape.count(-1) <= 1, "mesh.shape", shape, "at most one axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    check(num_devices % known == 0, "mesh.shape", shape,
          f"the fixed axes ({known} devices) do not divide the {num_devices} devices")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  check(math.prod(shape) == num_devices, "mesh.shape", shape,
        f"multiplies to {math.prod(shape)} but there are {num_devices} devices")
  return shape


DCN_AXIS = "dcn"


def effective_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """`config.sharding_rules` as tuples; with a `dcn` mesh axis (multi-slice TPU:
  `mesh.axes=('dcn', 'data', 'fsdp', 'tensor')`, `mesh.shape=(slices, ...)`) the batch is
  also split over it, so slices are data parallel over the data-center network while every
  other axis stays inside a slice's ICI."""
  rules = []
  for name, target in config.sharding_rules:
    target = tuple(target) if isinstance(target, list) else target
    if name == "activation_batch" and DCN_AXIS in tuple(config.mesh.axes):
      targets = () if target is None else (target,) if isinstance(target, str) else target
      if DCN_AXIS not in targets:
        target = (DCN_AXIS,) + tuple(targets)
    rules.append((name, target))
  return tuple(rules)


def batch_ways(config: ml_collections.ConfigDict, shape: Sequence[int]) -> int:
  """Into how many parts the batch is split on a mesh of `shape`."""
  sizes = dict(zip(config.mesh.axes, shape))
  target = dict(effective_rules(config))["activation_batch"]
  targets = () if target is None else (target,) if isinstance(target, str) else target
  return math.prod(sizes.get(t, 1) for t in targets)


def validate_rules(config: ml_collections.ConfigDict) -> None:
  mesh_axes = set(config.mesh.axes)
  seen = set()
  for i, rule in enumerate(config.sharding_rules):
    key = f"sharding_rules[{i}]"
    check(len(rule) == 2, key, rule, "a rule is (logical_axis, mesh_axes)")
    name, target = rule
    check(name in axes.LOGICAL_AXES, key, rule,
          f"unknown logical axis {name!r}{did_you_mean(name, axes.LOGICAL_AXES)}")
    check(name not in seen, key, rule, f"logical axis {name!r} has two rules")
    seen.add(name)
    targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    for t in targets:
      check(t in mesh_axes, key, rule,
            f"mesh axis {t!r} is not in mesh.axes={tuple(config.mesh.axes)}")
  missing = [a for a in axes.LOGICAL_AXES if a not in seen]
  check(not missing, "sharding_rules", "...", f"no rule for logical axes {missing}")
