"""Model families by name: `config.model.name` selects one.

A family is a package under `models/` that exposes, as mPLUG-2 does
(`models/mplug2/__init__.py`):

  NAME, SIZES, TASKS, TASK_MODULES       names, size presets, tasks, modules per task
  model_config(size, task)               `config.model` with the preset's values
  validate(model_cfg)                    ConfigError naming the first bad model key
  batch_schema(model_cfg, data_cfg, batch_size, task="")   the task's batch arrays
  init_batch(model_cfg)                  a zero batch for parameter init
  synthetic_batch(model_cfg, schema, rng)  random arrays of a schema
  build(model_cfg, *, deterministic, collect, use_cache)   the Flax module
  objectives                             losses and state kept between steps
  predict                                inference for the evaluators
  train_step_flops(config, shapes)       analytic FLOPs
  CONVERSION                             its conversion package, imported by name

Nothing outside `models/<family>` and `convert/<family>` imports a family's modules:
everything else reaches a family through `get(name)` / `of(model_cfg)`.
"""

from __future__ import annotations

import importlib
import types

import ml_collections

from mplug2_jax import config_lib
from mplug2_jax.layers import attention_op, stack

FAMILIES = {
    "mplug2": "mplug2_jax.models.mplug2",
    "owl2": "mplug2_jax.models.owl2",
}
DTYPES = ("float32", "bfloat16", "float16")


def get(name: str) -> types.ModuleType:
  if name not in FAMILIES:
    raise config_lib.ConfigError("model.name", name, f"must be one of {tuple(FAMILIES)}"
                                 f"{config_lib.did_you_mean(name, FAMILIES)}")
  return importlib.import_module(FAMILIES[name])


def of(model_cfg: ml_collections.ConfigDict) -> types.ModuleType:
  """The family of `config.model`."""
  return get(model_cfg.name)


def model_config(name: str, size: str, task: str) -> ml_collections.ConfigDict:
  return get(name).model_config(size, task)


def build(model_cfg: ml_collections.ConfigDict, **kwargs):
  return of(model_cfg).build(model_cfg, **kwargs)


def validate(model_cfg: ml_collections.ConfigDict) -> None:
  """The keys every family has, then the family's own checks."""
  family = of(model_cfg)
  check = config_lib.check
  check(model_cfg.size in family.SIZES, "model.size", model_cfg.size,
        f"must be one of {family.SIZES}")
  for key in ("dtype", "param_dtype"):
    check(model_cfg[key] in DTYPES, f"model.{key}", model_cfg[key], f"must be one of {DTYPES}")
  check(model_cfg.attention in attention_op.ATTENTION_IMPLEMENTATIONS, "model.attention",
        model_cfg.attention, f"must be one of {attention_op.ATTENTION_IMPLEMENTATIONS}")
  check(model_cfg.remat_policy in stack.REMAT_POLICIES, "model.remat_policy",
        model_cfg.remat_policy, f"must be one of {sorted(stack.REMAT_POLICIES)}"
        f"{config_lib.did_you_mean(model_cfg.remat_policy, stack.REMAT_POLICIES)}")
  family.validate(model_cfg)
