"""The train loop: `train(config, workdir)`, in big_vision's banner-section order.

  logging -> mesh -> input -> model -> update step (compiled ahead, memory logged)
  -> load checkpoint -> loop -> export

Resume order: the latest checkpoint in `workdir/checkpoints` (train state + data iterator,
exact), else `config.init_checkpoint` (a parameters directory, `param_store.py`;
parameters only, the optimizer starts fresh), else scratch (`config.seed`).

Steps. The loop counts *batches consumed* (`step` below, the checkpoint label and the
x-axis of every log); `state.step` counts optimizer updates, which is smaller by the number
of non-finite steps the guard skipped (`nonfinite_total`). The run ends after
`config.total_steps` batches.

In-loop evaluation is given by the caller (`evaluator`: mesh -> params -> metrics; the
entry points build it with `evaluate.in_loop.make_evaluator`), so training does not
depend on the evaluators.

Failures: a checkpoint that cannot be written (a full disk) stops the run at the first
failed save with `checkpointing.CheckpointSaveError` (one line; the previous checkpoint
stays intact); a checkpoint that fails verification on restore is skipped for the previous
one or stops the run (`config.checkpoint.on_corrupt`); the exported parameters are never
written with a non-finite value (`param_store.save_params`).

Outputs in `workdir` (process 0; local or gs://, every path through etils.epath):
`config.json`, `metrics.jsonl`, TensorBoard events in `tb/`, `loss_curves.png` at the end,
`checkpoints/<step>/`, when the run is done the final parameters (`params/` +
`model_config.json`), and `run_status.json` ({"status": done | preempted | stopped, "step"})
when an invocation ends, which the launchers' restart loops read.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from mplug2_jax import distributed, param_store, sharding
from mplug2_jax.models import registry, schema as schema_lib
from mplug2_jax.train import checkpointing
from mplug2_jax.train import metrics as metrics_lib
from mplug2_jax.train import state as state_lib
from mplug2_jax.train import step as step_lib

Evaluator = Callable[[Any], Callable[[Any], dict[str, float]]]
STATUS_FILE = "run_status.json"


def make_input(config: ml_collections.ConfigDict, batch_sharding):
  """The training iterator: the Grain pipeline, or synthetic batches when asked for."""
  if config.synthetic_data:
    from mplug2_jax.data import synthetic

    logging.warning("synthetic_data=True: training on random batches, not on a dataset")
    return synthetic.SyntheticIterator(config, batch_sharding, seed=int(config.seed))
  from mplug2_jax.data import pipeline

  return pipeline.make_iterator(config.data, split=config.data.train_split,
                                batch_size=int(config.batch_size), model_cfg=config.model,
                                seed=int(config.seed), sharding=batch_sharding)


def _host_scalars(metrics: dict) -> dict[str, float]:
  out = {}
  for k, v in jax.device_get(metrics).items():
    v = np.asarray(v)
    if v.ndim == 0:
      out[k] = float(v)
  return out


def _log_memory(compiled) -> None:
  try:
    mem = compiled.memory_analysis()
  except Exception as e:  # noqa: BLE001  (not every backend has one)
    logging.info("no memory analysis: %s", e)
    return
  if mem is not None:
    logging.info("step-0 memory analysis: arguments %.1f MB, outputs %.1f MB, temporaries "
                 "%.1f MB, generated code %.1f MB (per device)",
                 mem.argument_size_in_bytes / 2**20, mem.output_size_in_bytes / 2**20,
                 mem.temp_size_in_bytes / 2**20, mem.generated_code_size_in_bytes / 2**20)


def train(config: ml_collections.ConfigDict, workdir: str, *, evaluator: Evaluator | None = None,
          stop_after: int | None = None) -> dict[str, Any]:
  """Trains `config` in `workdir`; returns a summary (last metrics, status, steps).

  `stop_after`: return after this many steps of *this* invocation (saving a checkpoint
  first), as an interruption would; tests use it. SIGTERM is caught from the start (a
  notice during compilation stops the run after its first step, with a checkpoint).
  """
  with checkpointing.PreemptionGuard() as guard:
    return _train(config, param_store.resolve(workdir), evaluator, stop_after, guard)


def _train(config, workdir: epath.Path, evaluator, stop_after, guard) -> dict[str, Any]:
  # ================================================================== logging
  is_main = jax.process_index() == 0
  workdir.mkdir(parents=True, exist_ok=True)
  total, batch_size = int(config.total_steps), int(config.batch_size)
  logging.info("workdir %s: %d steps of %d examples, process %d/%d, %d devices", workdir,
               total, batch_size, jax.process_index(), jax.process_count(), jax.device_count())
  if is_main:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))

  # ================================================================== mesh
  mesh = sharding.make_mesh(config)
  batch_sharding = sharding.batch_sharding(mesh, config)
  logging.info("mesh %s", dict(mesh.shape))

  # ================================================================== input
  it = make_input(config, batch_sharding)
  schema = registry.of(config.model).batch_schema(config.model, config.data, batch_size)
  # The first batch is checked against the family's schema, then the iterator rewinds.
  before = it.get_state()
  schema_lib.check_batch(schema, next(it), what="the first training batch")
  it.set_state(before)
  abstract_batch = {k: jax.ShapeDtypeStruct(f.shape, f.dtype, sharding=batch_sharding)
                    for k, f in schema.items()}
  logging.info("batch %s", {k: (f.shape, str(f.dtype)) for k, f in schema.items()})

  # ================================================================== model
  setup = state_lib.TrainSetup(config, mesh, abstract_batch)
  logging.info("model %s %s/%s: %s parameters", config.model.name, config.model.size,
               config.model.task, f"{sharding.count_params(setup.abstract_params):,}")
  abstract_state = setup.abstract_sharded_state()

  # ================================================================== update step
  t0 = time.time()
  compiled = step_lib.JittedStep(setup).lower(abstract_state, abstract_batch).compile()
  logging.info("train step compiled in %.1fs", time.time() - t0)
  _log_memory(compiled)
  step_flops = setup.family.train_step_flops(config, {k: f.shape for k, f in schema.items()})
  xla_flops = step_lib.xla_cost(compiled).get("flops", 0.0)
  logging.info("FLOPs per step: analytic %.4g (global batch); XLA cost analysis %.4g (one "
               "device's program, a scanned layer stack counted once)", step_flops, xla_flops)
  peak = float(config.peak_tflops) * jax.device_count()
  # Processes compile at different speeds (a cache hit on one, a compile on another); the
  # first collective below (the checkpoint directory's sync) must not wait on a late one.
  distributed.barrier("train step compiled")

  # ================================================================== load checkpoint
  ckpt = checkpointing.Checkpoints(workdir / "checkpoints", config.checkpoint)
  start = ckpt.latest_step()
  if start is not None:
    state, start = ckpt.restore(abstract_state, it)
    logging.info("resumed from %s at step %d", ckpt.directory, start)
  else:
    start = 0
    state = setup.init()
    if config.init_checkpoint:
      state = setup.with_initial_params(state, config.init_checkpoint)
      logging.info("initialised from %s", config.init_checkpoint)
    else:
      logging.info("training from scratch (seed %d)", int(config.seed))

  # ================================================================== loop
  evaluate = evaluator(mesh) if evaluator is not None else None
  eval_every = int(config.eval_every_steps)
  writer = metrics_lib.MetricWriter(workdir, resume_step=start, enabled=is_main)
  max_nonfinite = int(config.max_nonfinite_steps)
  log_every = int(config.log_every_steps)
  save_every = int(config.checkpoint.every_steps)
  status, step, last = "done", start, {}
  interval_start, interval_steps = time.time(), 0
  run_start, run_steps = time.time(), 0
  pending, saved = None, start
  try:
    while step < total:
      batch = next(it)
      state, metrics = compiled(state, batch)
      step += 1
      run_steps += 1
      interval_steps += 1
      # NaN guard, one step behind so that the host does not wait for every step.
      if pending is not None:
        step_lib.check_nonfinite(jax.device_get(pending), max_nonfinite, step - 1)
      pending = metrics
      if step % log_every == 0 or step == total or step == start + 1:
        scalars = _host_scalars(metrics)
        step_lib.check_nonfinite(scalars, max_nonfinite, step)
        rate = interval_steps / max(time.time() - interval_start, 1e-9)
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
          print(metrics_lib.progress_line(step, total, scalars), flush=True)
        last = scalars
        interval_start, interval_steps = time.time(), 0
      eval_metrics = None
      if evaluate is not None and (step % eval_every == 0 or step == total):
        t_eval = time.time()
        eval_metrics = evaluate(state.params)
        writer.write(step, eval_metrics)
        if is_main:
          shown = " ".join(f"{k[5:]} {v:.4g}" for k, v in list(eval_metrics.items())[:6])
          print(f"step {step}/{total} | eval ({time.time() - t_eval:.0f}s) | {shown}",
                flush=True)
        interval_start += time.time() - t_eval  # the rate counts training only
      if (step % save_every == 0 or eval_metrics) and ckpt.save(step, state, it, eval_metrics,
                                                                force=True):
        saved = step
      ckpt.check()  # a failed asynchronous save stops the run here, at its first failure
      if guard.should_stop(step, ckpt):
        status = "preempted"
        logging.warning("preemption notice at step %d: saving and stopping", step)
        break
      if stop_after is not None and run_steps >= stop_after and step < total:
        status = "stopped"
        break
    if pending is not None:
      step_lib.check_nonfinite(jax.device_get(pending), max_nonfinite, step)
    if saved != step:
      ckpt.save(step, state, it, force=True)
  finally:  # a NonFiniteError still finishes pending saves and flushes the logs
    ckpt.close()
    writer.close()
  if hasattr(it, "close"):
    it.close()
  exported = None
  if status == "done":
    # The final parameters where `evaluate --checkpoint` and `init_checkpoint` read them,
    # so a fine-tuning or an evaluation starts from `workdir` itself.
    exported = str(param_store.save_params(workdir, state.params, config.model))
    logging.info("final parameters exported to %s/%s", exported, param_store.PARAMS_DIR)
  png = metrics_lib.plot_losses(workdir) if is_main and status == "done" else None
  if is_main:
    (workdir / STATUS_FILE).write_text(json.dumps(
        {"status": status, "step": step, "total_steps": total}) + "\n")
  logging.info("%s at step %d (%s)", status, step, png or "no plot")
  return {"status": status, "step": step, "metrics": last, "plot": png, "export": exported,
          "step_flops": step_flops, "xla_flops": xla_flops}
