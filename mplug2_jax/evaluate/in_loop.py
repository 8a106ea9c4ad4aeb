"""Evaluation inside a training run: `make_evaluator(config)` -> mesh -> params -> metrics.

On when `config.eval_every_steps` > 0: every that many steps (and at the last step) the
train loop evaluates the current parameters on `config.data.eval_split` with the task's
evaluator (settings from `config.eval`, as the evaluate CLI) and logs the flat numeric
metrics as `eval/<name>`; `checkpoint.best_metric` (e.g. "eval/CIDEr") keeps the best
checkpoints. The entry points build it and hand it to `train.loop.train`.
"""

from __future__ import annotations

from typing import Callable

import ml_collections
from absl import logging

from mplug2_jax import sharding
from mplug2_jax.evaluate import common


def make_evaluator(config: ml_collections.ConfigDict) -> Callable | None:
  """The train loop's `evaluator` (mesh -> params -> {"eval/<metric>": value}), or None."""
  if not int(config.eval_every_steps):
    return None
  if config.synthetic_data:
    logging.info("in-loop evaluation off: synthetic data has no held-out split")
    return None
  from mplug2_jax.data import pipeline

  task = config.eval_task or config.model.task
  common.task_module(task)  # an unknown task fails here, before any compute

  def for_mesh(mesh):
    eval_cfg = common.complete_settings(task, config.eval, config.data, mesh, config)
    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    data_cfg.task = task

    def evaluate(params) -> dict[str, float]:
      iterator = pipeline.make_iterator(
          data_cfg, split=config.data.eval_split, batch_size=int(eval_cfg.batch_size),
          model_cfg=config.model, sharding=sharding.batch_sharding(mesh, config))
      _, metrics = common.evaluate(task, config.model, params, iterator, eval_cfg, log=None,
                                   mesh=mesh, rules_config=config)
      return {f"eval/{k}": float(v) for k, v in metrics.items()
              if isinstance(v, (int, float)) and k != "num"}

    return evaluate

  return for_mesh
