"""Evaluation of one task from a checkpoint: predictions, metrics JSON and the table.

The library side of `python -m mplug2_jax.evaluate` (evaluate/__main__.py), also called
in-process by the demo job. Output files per task: see evaluate/__main__.py.
"""

from __future__ import annotations

import json
import time

from etils import epath

RESULT_FILES = {"caption": "caption_result.json", "videoqa": "qa_result.json",
                "retrieval": "retrieval_result.json",
                "classification": "classification_result.json",
                "grounding": "grounding_result.json"}


def metric_table(metrics: dict, paper: dict | None = None) -> str:
  """Aligned `metric  ours  paper` lines (nested dicts flattened with '/')."""
  flat = {}

  def walk(prefix, d):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(f"{prefix}{k}/", v)
      elif isinstance(v, (int, float)):
        flat[prefix + k] = v

  walk("", metrics)
  paper = dict(paper or {})
  width = max([len(k) for k in flat] + [6])
  lines = [f"{'metric':<{width}}  {'ours':>10}  {'paper':>10}"]
  for k, v in flat.items():
    p = paper.get(k)
    p = "" if p is None else (f"{p:.4g}" if isinstance(p, (int, float)) else str(p))
    lines.append(f"{k:<{width}}  {v:>10.4f}  {p:>10}")
  return "\n".join(lines)


def write_outputs(workdir, task: str, rows: list, metrics: dict, config,
                  seconds: float) -> epath.Path:
  out = epath.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
  (out / RESULT_FILES[task]).write_text(json.dumps(rows, indent=1))
  if task == "videoqa" and config.eval.submission:
    (out / "vqa_result.json").write_text(json.dumps(
        [{"question_id": r["question_id"], "answer": r["pred_answer"]} for r in rows]))
  if task == "grounding":
    from mplug2_jax.evaluate import grounding
    log = out / "eval_log.txt"  # appended to (read + rewrite: object stores cannot append)
    before = log.read_text() if log.exists() else ""
    log.write_text(before + grounding.official_log_line(
        config.eval.split, metrics["accuracy_iou50"]) + "\n")
  (out / "metrics.json").write_text(json.dumps(
      {"task": task, "metrics": metrics, "paper": config.paper.to_dict(),
       "seconds": seconds, "config": json.loads(config.to_json())}, indent=2))
  return out


def run(config, checkpoint: str, workdir: str | None, log=print) -> tuple[list, dict]:
  """Evaluates `config.task` with the parameters directory `checkpoint`."""
  import jax
  import ml_collections

  from mplug2_jax import param_store, sharding
  from mplug2_jax.data import pipeline
  from mplug2_jax.evaluate import common
  from mplug2_jax.models import registry

  task = config.task
  ckpt = epath.Path(checkpoint)
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
  if (ckpt / param_store.MODEL_CONFIG_FILE).exists():
    config.model = param_store.load_model_config(ckpt)
  model_cfg = config.model
  family = registry.of(model_cfg)
  needed = family.TASK_MODULES[common.task_module(task).MODEL_TASK]
  have = family.TASK_MODULES.get(model_cfg.task, set())
  if not needed <= have:  # e.g. a pre-trained model serves zero-shot retrieval
    raise ValueError(f"{ckpt} holds a {model_cfg.task!r} model without {sorted(needed - have)}"
                     f", which the {task} evaluation needs")
  if not config.data.mixture:
    raise ValueError("config.data.mixture is empty: pass --config FILE:data=DIR (a dataset "
                     "built with python -m mplug2_jax.data.build)")
  # Every device of every process evaluates a slice of each batch (data axes of the mesh);
  # the parameters are sharded by the logical rules, as in training.
  mesh = sharding.make_mesh(config)
  config.eval = common.complete_settings(task, config.eval, config.data, mesh, config)
  log(f"loading {ckpt} ...")
  params = param_store.load_params(ckpt)
  # Before any data set-up or compilation: parameters of another size or task fail here,
  # naming the differing keys, not at jit time.
  abstract = sharding.flat(sharding.unboxed(sharding.abstract_params(
      family.build(model_cfg), family.init_batch(model_cfg))))
  param_store.check_shapes(param_store.flatten(params), abstract, ckpt)
  iterator = pipeline.make_iterator(config.data, split=config.eval.split,
                                    batch_size=config.eval.batch_size, model_cfg=model_cfg,
                                    sharding=sharding.batch_sharding(mesh, config))
  start = time.time()
  rows, metrics = common.evaluate(task, model_cfg, params, iterator, config.eval, log=log,
                                  mesh=mesh, rules_config=config)
  seconds = time.time() - start
  if jax.process_index() == 0:
    workdir = workdir or str(ckpt / "eval" / task)
    out = write_outputs(workdir, task, rows, metrics, config, seconds)
    log(metric_table(metrics, config.paper.to_dict()))
    log(f"{len(rows)} predictions and metrics.json in {out} ({seconds:.1f}s)")
  return rows, metrics
