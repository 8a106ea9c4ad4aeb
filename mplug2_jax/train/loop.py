"""The train loop: `train(config, workdir)`, in big_vision's banner-section order.

  logging -> mesh -> input -> model -> shard -> update step (compiled ahead, memory logged)
  -> load checkpoint -> loop

Resume order: the latest checkpoint in `workdir/checkpoints` (train state + data iterator,
exact), else `config.init_checkpoint` (an orbax params directory written by
`python -m mplug2_jax.convert import-official|init-pretrained`; parameters only, the
optimizer starts fresh), else scratch (`config.seed`).

Steps. The loop counts *batches consumed* (`step` below, the checkpoint label and the
x-axis of every log); `state.step` counts optimizer updates, which is smaller by the number
of non-finite steps the guard skipped (`nonfinite_total`). The run ends after
`config.total_steps` batches.

Outputs in `workdir` (process 0): `metrics.jsonl` (one JSON object per log step),
TensorBoard event files in `tb/` (tensorboardX, if installed), `loss_curves.png`
(matplotlib, if installed) at the end, `checkpoints/<step>/`.

Config keys read besides the base sections: `batch_size` (global), `text_length`,
`log_every_steps` (10), `peak_tflops` (per device, for MFU; 0 = not reported),
`init_checkpoint` (""), `synthetic_data` (False: random batches instead of
`config.data`, for timing and tests).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mplug2_jax import sharding
from mplug2_jax.models import mplug2
from mplug2_jax.train import checkpointing, flops as flops_lib, objectives
from mplug2_jax.train import optimizer as optimizer_lib
from mplug2_jax.train import state as state_lib
from mplug2_jax.train import step as step_lib


# --------------------------------------------------------------------------------------
# Metric writers: console, JSONL, TensorBoard; the loss plot.
# --------------------------------------------------------------------------------------


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricWriter:
  """Writes scalars to JSONL + TensorBoard and prints the progress line (process 0 only)."""

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    # A resumed run drops the rows logged after its checkpoint (they are recomputed).
    if os.path.exists(self.path):
      with open(self.path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(rows)
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step + 1)
    except ImportError:
      logging.warning("tensorboardX is not installed: no TensorBoard events")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **scalars}) + "\n")
    if self.tb is not None:
      for k, v in scalars.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self.tb.add_scalar(k, v, step)
      self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def progress_line(step: int, total: int, s: dict[str, float]) -> str:
  parts = [f"step {step}/{total}", f"loss {s['loss']:.4f}"]
  per = [f"{k[5:]} {v:.3f}" for k, v in s.items() if k.startswith("loss/")]
  if per:
    parts[-1] += " (" + " ".join(per) + ")"
  parts.append(f"lr {s['lr']:.2e}")
  parts.append(f"gnorm {s['grad_norm']:.3f}")
  if "perf/samples_per_sec" in s:
    parts.append(f"{s['perf/samples_per_sec']:.1f} samples/s")
  if "perf/tflops_per_sec" in s:
    mfu = f" MFU {100 * s['perf/mfu']:.1f}%" if "perf/mfu" in s else ""
    parts.append(f"{s['perf/tflops_per_sec']:.3f} TFLOP/s{mfu}")
  if s.get("nonfinite_total"):
    parts.append(f"skipped {int(s['nonfinite_total'])} non-finite")
  if s.get("data/bad/total"):
    parts.append(f"bad samples {int(s['data/bad/total'])}")
  if "perf/eta_sec" in s:
    parts.append(f"ETA {_fmt_time(s['perf/eta_sec'])}")
  return " | ".join(parts)


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_losses(workdir: str, out: str | None = None) -> str | None:
  """PNG of the total and per-objective losses over steps; None without matplotlib."""
  rows = read_metrics(workdir)
  if not rows:
    return None
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    logging.warning("matplotlib is not installed: no loss plot")
    return None
  keys = sorted({k for r in rows for k in r if k == "loss" or k.startswith("loss/")})
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for k in keys:
    pts = [(r["step"], r[k]) for r in rows if k in r and math.isfinite(r[k])]
    if pts:
      ax.plot(*zip(*pts), label=k, linewidth=2 if k == "loss" else 1)
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_title("training losses")
  ax.grid(alpha=0.3)
  ax.legend()
  out = out or os.path.join(workdir, "loss_curves.png")
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


# --------------------------------------------------------------------------------------
# Synthetic input (no dataset): deterministic global batches, sliced per process.
# --------------------------------------------------------------------------------------


class SyntheticIterator:
  """Random batches of the pipeline's format, a pure function of (seed, position).

  Every process computes the same global batch and keeps its rows, so the global batch does
  not depend on the process count (the 2-process test relies on it).
  """

  def __init__(self, config: ml_collections.ConfigDict, batch_sharding, seed: int = 0):
    self.config, self.sharding, self.seed, self.position = config, batch_sharding, seed, 0

  def global_batch(self, position: int) -> dict[str, np.ndarray]:
    m, b = self.config.model, int(self.config.batch_size)
    length = int(self.config.get("text_length", 8))
    rng = np.random.default_rng([self.seed, position])
    batch = {k: np.asarray(v) for k, v in mplug2.dummy_batch(m, b, length).items()}
    batch["video"] = rng.normal(size=batch["video"].shape).astype(np.float32)
    for key in ("text_ids", "caption_ids", "answer_ids"):
      if key in batch:
        n = batch[key].shape[0]
        ids = rng.integers(104, m.text.vocab_size, (n, length)).astype(np.int32)
        ids[:, 0] = objectives.CLS_ID
        lengths = rng.integers(max(2, length // 2), length + 1, n)
        mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
        batch[key] = np.where(mask > 0, ids, 0).astype(np.int32)
        batch[key.replace("_ids", "_mask")] = mask
        batch[key.replace("_ids", "_labels")] = np.where(mask > 0, ids, -100).astype(np.int32)
    if "text_ids" in batch:
      batch["image_ids"] = rng.integers(0, 4 * b, b).astype(np.int32)
    if "answer_ids" in batch:
      batch["answer_weights"] = np.ones(batch["answer_ids"].shape[0], np.float32)
    if m.task == "classification":
      batch["labels"] = rng.integers(0, m.num_classes, b).astype(np.int32)
    return batch

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    batch = self.global_batch(self.position)
    self.position += 1
    count, index = jax.process_count(), jax.process_index()
    out = {}
    for k, v in batch.items():
      rows = v.shape[0] // count
      out[k] = jax.make_array_from_process_local_data(self.sharding,
                                                      v[index * rows:(index + 1) * rows])
    return out

  def metrics(self) -> dict[str, int]:
    return {}

  def get_state(self) -> dict[str, int]:
    return {"position": self.position}

  def set_state(self, state: dict[str, int]) -> None:
    self.position = int(state["position"])

  def close(self) -> None:
    pass


# --------------------------------------------------------------------------------------
# Initial parameters from a converted checkpoint.
# --------------------------------------------------------------------------------------


def _flat(tree: Any) -> dict[str, Any]:
  return {optimizer_lib.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_init_params(directory: str, trainer: state_lib.Trainer, params: Any) -> Any:
  """`params` with every leaf found in the orbax params dir `directory` replaced (placed
  straight into its sharding); shape mismatches raise, leaves missing from the checkpoint
  keep their initial values and are logged."""
  from mplug2_jax.convert import checkpoints

  loaded = _flat(checkpoints.load_params(directory))
  shardings = _flat(trainer.param_shardings)
  missing, used = [], set()

  def one(path, value):
    name = optimizer_lib.path_str(path)
    if name not in loaded:
      missing.append(name)
      return value
    array = np.asarray(loaded[name])
    if array.shape != value.shape:
      raise ValueError(f"init_checkpoint {directory}: {name} has shape {array.shape}, the "
                       f"model expects {value.shape}")
    used.add(name)
    array = array.astype(value.dtype)
    return jax.make_array_from_callback(array.shape, shardings[name], lambda idx: array[idx])

  out = jax.tree_util.tree_map_with_path(one, params)
  unused = sorted(set(loaded) - used)
  logging.info("init_checkpoint %s: %d parameters loaded, %d kept from init %s, %d unused %s",
               directory, len(used), len(missing), missing[:8], len(unused), unused[:8])
  return out


def make_evaluator(config: ml_collections.ConfigDict, mesh=None):
  """The in-loop evaluation: params -> {"eval/<metric>": value}, or None when off.

  On when `config.eval_every_steps` > 0: every that many steps (and at the last step) the
  current parameters are evaluated on `config.data.eval_split` by the task's evaluator
  (`evaluate/tasks.py`, settings from `config.eval`, the same as the evaluate CLI) and the
  flat numeric metrics are logged as eval/<name>. `checkpoint.best_metric` (e.g.
  "eval/CIDEr") then keeps the best checkpoints.
  """
  every = int(config.get("eval_every_steps", 0) or 0)
  if not every:
    return None
  if config.get("synthetic_data", False):
    logging.info("in-loop evaluation off: synthetic data has no held-out split")
    return None
  from mplug2_jax.data import pipeline
  from mplug2_jax.evaluate import tasks

  task = config.get("eval_task", "") or config.model.task
  if task not in tasks.TASKS:
    raise ValueError(f"eval_task {task!r} has no evaluator; known: {tasks.TASKS}")
  eval_cfg = tasks.complete_settings(task, config.eval, config.data, mesh, config)
  data_cfg = ml_collections.ConfigDict(config.data.to_dict())
  data_cfg.task = task

  def evaluate(params) -> dict[str, float]:
    iterator = pipeline.make_iterator(
        data_cfg, split=config.data.eval_split, batch_size=int(eval_cfg.batch_size),
        model_cfg=config.model,
        sharding=None if mesh is None else sharding.batch_sharding(mesh, config))
    _, metrics = tasks.evaluate(task, config.model, params, iterator, eval_cfg, log=None,
                                mesh=mesh, rules_config=config)
    return {f"eval/{k}": float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and k != "num"}

  return evaluate


# --------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------


def check_input(config: ml_collections.ConfigDict) -> None:
  """Fails fast (before any compute) when the training data cannot be found."""
  from mplug2_jax import config_lib

  if config.get("synthetic_data", False):
    return
  if not config.data.mixture:
    raise config_lib.ConfigError("data.mixture", config.data.mixture,
                                 "no training data (or set synthetic_data=True)")
  for entry in config.data.mixture:
    path = entry[0]
    if "://" not in path and not os.path.exists(path):
      raise config_lib.ConfigError("data.mixture", path, "does not exist (build it with "
                                   "`python -m mplug2_jax.data.build` or `.data.demo`)")


def _host_scalars(metrics: dict) -> dict[str, float]:
  out = {}
  for k, v in jax.device_get(metrics).items():
    v = np.asarray(v)
    if v.ndim == 0:
      out[k] = float(v)
  return out


def _shape_tree(batch: dict) -> dict:
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None))
          for k, v in batch.items()}


def train(config: ml_collections.ConfigDict, workdir: str,
          stop_after: int | None = None) -> dict[str, Any]:
  """Trains `config` in `workdir`; returns a summary (last metrics, status, steps).

  `stop_after`: return after this many steps of *this* invocation (saving a checkpoint
  first), as an interruption would; tests use it. SIGTERM is caught from the start (a
  notice during compilation stops the run after its first step, with a checkpoint).
  """
  with checkpointing.PreemptionGuard() as guard:
    return _train(config, workdir, stop_after, guard)


def _train(config, workdir, stop_after, guard) -> dict[str, Any]:
  # ================================================================== logging
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  total = int(config.total_steps)
  log_every = int(config.get("log_every_steps", 10))
  batch_size = int(config.batch_size)
  logging.info("workdir %s: %d steps of %d examples, process %d/%d, %d devices", workdir,
               total, batch_size, jax.process_index(), jax.process_count(), jax.device_count())
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))

  # ================================================================== mesh
  mesh = sharding.make_mesh(config)
  batch_sharding = sharding.batch_sharding(mesh, config)
  logging.info("mesh %s", dict(mesh.shape))

  # ================================================================== input
  if config.get("synthetic_data", False):
    it = SyntheticIterator(config, batch_sharding, seed=int(config.seed))
  else:
    from mplug2_jax.data import pipeline
    it = pipeline.make_iterator(config.data, split=config.data.train_split,
                                batch_size=batch_size, model_cfg=config.model,
                                seed=int(config.seed), sharding=batch_sharding)
  # The batch format, without consuming a batch: peek and rewind.
  before = it.get_state()
  first = next(it)
  it.set_state(before)
  abstract_batch = _shape_tree(first)
  del first
  logging.info("batch %s", {k: (v.shape, str(v.dtype)) for k, v in abstract_batch.items()})

  # ================================================================== model
  text_length = int(config.get("text_length", 8))
  example = mplug2.dummy_batch(config.model, 2, text_length)
  trainer = state_lib.Trainer(config, mesh, example)
  num_params = sharding.count_params(trainer.abstract_params)
  logging.info("model %s/%s: %s parameters", config.model.size, config.model.task,
               f"{num_params:,}")

  # ================================================================== shard
  abstract_state = trainer.abstract_sharded_state()

  # ================================================================== update step
  jitted = step_lib.JittedStep(trainer)
  t0 = time.time()
  compiled = jitted.lower(abstract_state, abstract_batch).compile()
  logging.info("train step compiled in %.1fs", time.time() - t0)
  try:
    mem = compiled.memory_analysis()
    if mem is not None:
      logging.info("step-0 memory analysis: arguments %.1f MB, outputs %.1f MB, temporaries "
                   "%.1f MB, generated code %.1f MB (per device)",
                   mem.argument_size_in_bytes / 2**20, mem.output_size_in_bytes / 2**20,
                   mem.temp_size_in_bytes / 2**20, mem.generated_code_size_in_bytes / 2**20)
  except Exception as e:  # noqa: BLE001
    logging.info("no memory analysis: %s", e)
  step_flops = flops_lib.train_step_flops(config, {k: v.shape for k, v in abstract_batch.items()})
  xla_flops = flops_lib.xla_cost(compiled).get("flops", 0.0)
  logging.info("FLOPs per step: analytic %.4g (global batch); XLA cost analysis %.4g (one "
               "device's program, a scanned layer stack counted once)", step_flops, xla_flops)
  peak = float(config.get("peak_tflops", 0.0)) * jax.device_count()

  # ================================================================== load checkpoint
  ckpt = checkpointing.Checkpoints(os.path.join(workdir, "checkpoints"), config.checkpoint)
  start = ckpt.latest_step()
  if start is not None:
    state, start = ckpt.restore(abstract_state, it)
    logging.info("resumed from %s at step %d", ckpt.directory, start)
  else:
    start = 0
    state = trainer.init()
    init_dir = config.get("init_checkpoint", "")
    if init_dir:
      params = load_init_params(init_dir, trainer, state.params)
      ema = state.ema_params
      if ema:
        ema = jax.tree.map(jnp.copy, objectives.momentum_subset(params))
      state = state.replace(params=params, ema_params=ema)
      logging.info("initialised from %s", init_dir)
    else:
      logging.info("training from scratch (seed %d)", int(config.seed))

  # ================================================================== loop
  evaluator = make_evaluator(config, mesh)
  eval_every = int(config.get("eval_every_steps", 0) or 0)
  writer = MetricWriter(workdir, resume_step=start, enabled=is_main)
  max_nonfinite = int(config.get("max_nonfinite_steps", 0))
  status, step, last = "done", start, {}
  interval_start, interval_steps = time.time(), 0
  run_start, run_steps = time.time(), 0
  pending, saved = None, start
  every = max(int(config.checkpoint.every_steps), 1)
  try:
    while step < total:
      batch = next(it)
      state, metrics = compiled(state, batch)
      step += 1
      run_steps += 1
      interval_steps += 1
      # NaN guard, one step behind so that the host does not wait for every step.
      if pending is not None:
        step_lib.check_nonfinite(jax.device_get(pending), max_nonfinite)
      pending = metrics
      if step % log_every == 0 or step == total or step == start + 1:
        scalars = _host_scalars(metrics)
        step_lib.check_nonfinite(scalars, max_nonfinite)
        elapsed = time.time() - interval_start
        rate = interval_steps / max(elapsed, 1e-9)
        scalars["perf/steps_per_sec"] = rate
        scalars["perf/samples_per_sec"] = rate * batch_size
        if step_flops:
          scalars["perf/tflops_per_sec"] = rate * step_flops / 1e12
          if peak:
            scalars["perf/mfu"] = rate * step_flops / 1e12 / peak
        run_rate = run_steps / max(time.time() - run_start, 1e-9)
        scalars["perf/eta_sec"] = (total - step) / max(run_rate, 1e-9)
        scalars.update({k: float(v) for k, v in it.metrics().items()})
        scalars["opt_step"] = scalars.pop("step")
        writer.write(step, scalars)
        if is_main:
          print(progress_line(step, total, scalars), flush=True)
        last = scalars
        interval_start, interval_steps = time.time(), 0
      eval_metrics = None
      if evaluator is not None and (step % eval_every == 0 or step == total):
        t_eval = time.time()
        eval_metrics = evaluator(state.params)
        writer.write(step, eval_metrics)
        if is_main:
          shown = " ".join(f"{k[5:]} {v:.4g}" for k, v in list(eval_metrics.items())[:6])
          print(f"step {step}/{total} | eval ({time.time() - t_eval:.0f}s) | {shown}",
                flush=True)
        interval_start += time.time() - t_eval  # the rate counts training only
      if (step % every == 0 or eval_metrics) and ckpt.save(step, state, it, eval_metrics,
                                                           force=True):
        saved = step
      if guard.should_stop(step, ckpt):
        status = "preempted"
        logging.warning("preemption notice at step %d: saving and stopping", step)
        break
      if stop_after is not None and run_steps >= stop_after and step < total:
        status = "stopped"
        break
    if pending is not None:
      step_lib.check_nonfinite(jax.device_get(pending), max_nonfinite)
    if saved != step:
      ckpt.save(step, state, it, force=True)
  finally:  # a NonFiniteError still finishes pending saves and flushes the logs
    ckpt.close()
    writer.close()
  if hasattr(it, "close"):
    it.close()
  exported = None
  if status == "done":
    # The final parameters in the layout `mplug2_jax.evaluate --checkpoint` and
    # `init_checkpoint` read (params/ + model_config.json), so that a fine-tuning or an
    # evaluation starts from `workdir` itself. Every process takes part in the save.
    from mplug2_jax.convert import checkpoints
    exported = str(checkpoints.save_params(workdir, state.params, config.model))
    logging.info("final parameters exported to %s/%s", exported, checkpoints.PARAMS_DIR)
  png = plot_losses(workdir) if is_main and status == "done" else None
  logging.info("%s at step %d (%s)", status, step, png or "no plot")
  return {"status": status, "step": step, "metrics": last, "plot": png, "export": exported,
          "step_flops": step_flops, "xla_flops": xla_flops}
