"""A whole experiment config: every section with its defaults, and its validation.

  base_config(size, task, family="mplug2")   what configs/*.py start from
  validate(config, num_devices=None, training=True)
                                             ConfigError naming the first bad key; cheap,
                                             runs before any mesh, array or compile
  check_input(config)                        the training data exists (or synthetic data
                                             was asked for)
  eval_experiment(task, arg, paper=...)      one paper result row (configs/eval/*.py)
  load("configs/x.py:arg")                   `get_config(arg)` of a config file, as
                                             `--config configs/x.py:arg` gives it

Each section's defaults live beside the code that reads it: `config.model` in the model
family (`models/<family>/config.py`), `config.data` in `data/__init__.py`,
`config.optimizer` in `train/optimizer.py`, `config.checkpoint` in
`train/checkpointing.py`, `config.objective` in the family's objectives, `config.eval` in
`evaluate/common.py`; the run-level keys are below. Nothing reads a key that has no default
here or there.
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections
from etils import epath

from mplug2_jax import config_lib
from mplug2_jax.config_lib import ConfigError, check
from mplug2_jax.models import registry


def base_config(size: str = "tiny", task: str = "videoqa",
                family: str = "mplug2") -> ml_collections.ConfigDict:
  """Every section with its defaults (documented where each section is defined)."""
  from mplug2_jax import data
  from mplug2_jax.evaluate import common as eval_common
  from mplug2_jax.train import checkpointing, optimizer

  models = registry.get(family)
  config = ml_collections.ConfigDict()
  config.model = models.model_config(size, task)
  config.mesh = config_lib.mesh_config()
  config.sharding_rules = config_lib.DEFAULT_RULES
  config.data = data.default_data_config()
  config.optimizer = optimizer.default_optimizer_config()
  config.objective = models.objectives.default_config()
  config.checkpoint = checkpointing.default_checkpoint_config()
  config.eval = eval_common.eval_config(task)
  # The run.
  config.batch_size = 8           # global examples per optimizer step
  config.total_steps = 0          # batches of the run (the cosine schedule's length)
  config.max_nonfinite_steps = 10  # consecutive non-finite steps that stop the run
  config.log_every_steps = 10     # console / JSONL / TensorBoard interval
  config.peak_tflops = 0.0        # per-device peak for MFU (0 = not reported)
  config.init_checkpoint = ""     # parameters directory (convert import-official /
                                  # init-pretrained, or a finished run's workdir)
  config.synthetic_data = False   # True: random batches of the model's batch schema
                                  # instead of config.data (timing runs, tests)
  config.seed = 0
  config.eval_every_steps = 0     # in-loop evaluation on data.eval_split; 0 = off
  config.eval_task = ""           # "" = model.task; e.g. "retrieval" for a pretraining run
  return config


def load(spec: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file in `spec` ("path.py" or "path.py:arg")."""
  path, _, arg = spec.partition(":")
  if not pathlib.Path(path).is_file():
    raise FileNotFoundError(f"config file {path} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"_config_{pathlib.Path(path).stem}",
                                                       path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None, *,
             training: bool = True) -> None:
  """Raises ConfigError naming the key of the first problem. `training=False` (conversion,
  evaluation) skips the keys of a training run."""
  from mplug2_jax import data

  registry.validate(config.model)
  family = registry.of(config.model)
  if hasattr(family, "validate_data") and "data" in config:
    family.validate_data(config.model, config.data)
  config_lib.validate_rules(config)
  data.validate(config.data)
  if training:
    _validate_run(config)
  if num_devices is not None:
    ways = config_lib.batch_ways(config, config_lib.mesh_shape(config, num_devices))
    if "batch_size" in config:
      check(config.batch_size % ways == 0, "batch_size", config.batch_size,
            f"not divisible by the batch's mesh axes (dcn x data x fsdp: {ways} ways)")
      if training:  # each device's rows split evenly over the micro-batches (local batches)
        accum = int(config.optimizer.accum_steps)
        check(config.batch_size % (ways * accum) == 0, "batch_size", config.batch_size,
              f"not divisible by optimizer.accum_steps={accum} x the {ways} dcn x data x fsdp "
              f"devices (each device's micro-batches must be equal)")


def _validate_run(config: ml_collections.ConfigDict) -> None:
  """The keys of a training run."""
  for key in ("batch_size", "total_steps", "log_every_steps"):
    check(isinstance(config[key], int) and config[key] > 0, key, config[key],
          "must be a positive integer")
  check(config.max_nonfinite_steps >= 0, "max_nonfinite_steps", config.max_nonfinite_steps,
        "must be >= 0 (0 = never stop)")
  check(config.eval_every_steps >= 0, "eval_every_steps", config.eval_every_steps, "must be >= 0")
  check(config.checkpoint.every_steps > 0, "checkpoint.every_steps",
        config.checkpoint.every_steps, "must be a positive integer")
  check(config.checkpoint.keep > 0, "checkpoint.keep", config.checkpoint.keep, "must be > 0")
  check(config.checkpoint.best_mode in ("max", "min"), "checkpoint.best_mode",
        config.checkpoint.best_mode, "must be 'max' or 'min'")
  objectives = registry.of(config.model).objectives
  if hasattr(objectives, "validate"):
    objectives.validate(config.objective)
  check(config.checkpoint.get("on_corrupt", "fallback") in ("fallback", "fail"),
        "checkpoint.on_corrupt", config.checkpoint.get("on_corrupt"),
        "must be 'fallback' or 'fail'")
  o = config.optimizer
  check(o.lr >= 0, "optimizer.lr", o.lr, "must be >= 0")
  for key in ("warmup_lr", "min_lr", "weight_decay", "grad_clip_norm"):
    check(o[key] >= 0, f"optimizer.{key}", o[key], "must be >= 0")
  check(isinstance(o.accum_steps, int) and o.accum_steps > 0, "optimizer.accum_steps",
        o.accum_steps, "must be a positive integer")
  check(config.batch_size % o.accum_steps == 0, "optimizer.accum_steps", o.accum_steps,
        f"does not divide batch_size={config.batch_size}")
  schedules = ("cosine_step", "cosine_epoch", "constant")
  check(o.schedule in schedules, "optimizer.schedule", o.schedule,
        f"must be one of {schedules}")
  for key in ("epoch0_dips", "steps_per_epoch", "epochs"):
    check(isinstance(o[key], int) and o[key] >= 0, f"optimizer.{key}", o[key],
          "must be an integer >= 0")
  if o.schedule == "cosine_epoch":
    for key in ("steps_per_epoch", "epochs", "warmup_stair"):
      check(o[key] > 0, f"optimizer.{key}", o[key], "must be > 0 with schedule='cosine_epoch'")
  if o.epoch0_dips:
    check(o.steps_per_epoch > 0, "optimizer.steps_per_epoch", o.steps_per_epoch,
          "must be > 0 with optimizer.epoch0_dips")
  check(0.0 < o.layer_decay <= 1.0, "optimizer.layer_decay", o.layer_decay,
        "must be in (0, 1] (1 = off)")
  for entry in o.partial:
    check(len(entry) == 3 and isinstance(entry[1], int) and len(entry[2]) > 0,
          "optimizer.partial", entry, "entries are (regex, axis, (trained indices, ...))")
  d = config.data
  check(d.truncation in ("expanded", "raw"), "data.truncation", d.truncation,
        "must be 'expanded' or 'raw'")
  check(d.instruct_format in ("conversation", "caption"), "data.instruct_format",
        d.instruct_format, "must be 'conversation' or 'caption'")
  check(d.image_aspect in ("pad", "resize", "crop"), "data.image_aspect", d.image_aspect,
        "must be 'pad', 'resize' or 'crop'")


def check_input(config: ml_collections.ConfigDict) -> None:
  """Fails fast (before any compute) when the training data cannot be found."""
  if config.synthetic_data:
    return
  if not config.data.mixture:
    raise ConfigError("data.mixture", config.data.mixture,
                      "no training data: give a built dataset (the config's data= argument), "
                      "or ask for random batches with synthetic_data=True")
  for entry in config.data.mixture:
    path = entry[0]
    if not epath.Path(path).exists():
      raise ConfigError("data.mixture", path, "does not exist (build it with "
                        "`python -m mplug2_jax.data.build` or `python -m mplug2_jax.data.demo`)")


# --------------------------------------------------------------------------------------
# Evaluation experiments (configs/eval/*.py build on this).
# --------------------------------------------------------------------------------------


def eval_experiment(task: str, arg: str | None = None, *, paper: dict | None = None,
                    data: dict | None = None, settings: dict | None = None,
                    model: dict | None = None, **defaults) -> ml_collections.ConfigDict:
  """The config of one paper result row.

  `arg` (the text after ":" in `--config FILE:arg`) may set size=, data= (built dataset
  directory), vocab= (BERT vocab.txt; default the shipped bert-base-uncased), split=,
  batch= (global batch size). `paper` maps metric keys to the paper's numbers (printed
  beside ours). The checkpoint's own model_config.json replaces `config.model` when
  present.
  """
  from mplug2_jax.evaluate import common as eval_common

  a = config_lib.parse_arg(arg, size="large", data="", vocab="bert-base-uncased",
                           split="test", batch=8, **defaults)
  config = base_config(a.size, eval_common.task_module(task).MODEL_TASK)
  config.task = task
  config.paper = ml_collections.ConfigDict(paper or {})
  for k, v in (model or {}).items():
    config.model[k] = v
  config.data.task = task
  config.data.mixture = ((a.data, 1.0),) if a.data else ()
  config.data.vocab_file = a.vocab
  config.data.eval_split = a.split
  for k, v in (data or {}).items():
    config.data[k] = v
  config.eval = eval_common.eval_config(task, split=a.split, batch_size=a.batch,
                                        **(settings or {}))
  return config
