"""The pure, sharded train step: `train_step(state, batch) -> (state, metrics)`.

One optimizer step per call, the objectives being the model family's (`objectives`):
  1. rng = fold_in(state.rng, state.step)
  2. extra <- objectives.before_update (mPLUG-2: the momentum model's EMA)
  3. loss and gradients, averaged over `optimizer.accum_steps` micro-batches (a scan; the
     batch is split strided so each device's rows stay on that device); the objectives get
     each micro-batch's iteration index and the number of local batches (`batch_shards`)
  4. AdamW update (parameter groups, schedule, clipping: optimizer.py)
  5. extra <- objectives.after_update with what the loss enqueued over the whole batch
     (mPLUG-2: ITC queues <- momentum features)
  6. NaN/Inf guard: if the loss or the gradient norm is not finite, every field keeps its
     old value (the step is skipped) except the non-finite counters; `check_nonfinite` on
     the host stops the run after K consecutive ones, naming the step and the losses.

Compiled with `jax.jit`: explicit in/out shardings (state by the logical rules, batch
split on its leading axis over the `activation_batch` mesh axes), state donated.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mplug2_jax import sharding
from mplug2_jax.train.state import TrainSetup, TrainState


class NonFiniteError(FloatingPointError):
  pass


def split_micro_batches(batch: dict, n: int) -> dict:
  """(B, ...) -> (n, B/n, ...), micro-batch i = rows i, i+n, ... (strided, so a device's
  contiguous rows feed every micro-batch). Answer rows (B*K, ...) are split with their
  question and `answer_question_index` is renumbered within the micro-batch."""
  num = next(v.shape[0] for k, v in batch.items() if not k.startswith("answer_"))
  if num % n:
    raise ValueError(f"batch of {num} is not divisible into {n} micro-batches "
                     "(config.optimizer.accum_steps)")
  out = {}
  for key, x in batch.items():
    if key.startswith("answer_"):
      k = x.shape[0] // num
      x = x.reshape(num // n, n, k, *x.shape[1:]).swapaxes(0, 1)
      x = x.reshape(n, (num // n) * k, *x.shape[3:])
      if key == "answer_question_index":
        x = x // n
    else:
      x = x.reshape(num // n, n, *x.shape[1:]).swapaxes(0, 1)
    out[key] = x
  return out


def make_train_step(setup: TrainSetup):
  """The un-jitted pure step for `setup` (see `JittedStep`)."""
  model, c, tx, objectives = setup.model, setup.objective, setup.tx, setup.objectives
  accum = int(setup.opt_config.accum_steps)
  shards = setup.batch_shards

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    params = state.params
    extra = objectives.before_update(state.extra, params, c)

    def loss_fn(p, micro, key, iteration):
      return objectives.loss(model, p, extra, micro, key, c, iteration=iteration,
                             shards=shards)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    first = state.step * accum  # the iteration (micro-batch) index of the run
    if accum == 1:
      (_, (metrics, enqueued)), grads = grad_fn(params, batch, rng, first)
    else:
      def body(total, xs):
        micro, key, iteration = xs
        (_, (m, e)), g = grad_fn(params, micro, key, iteration)
        return jax.tree.map(jnp.add, total, g), (m, e)

      zeros = jax.tree.map(jnp.zeros_like, params)
      total, (metrics, enqueued) = jax.lax.scan(
          body, zeros, (split_micro_batches(batch, accum), jax.random.split(rng, accum),
                        first + jnp.arange(accum, dtype=state.step.dtype)))
      grads = jax.tree.map(lambda g: g / accum, total)
      metrics = jax.tree.map(lambda v: jnp.mean(v, axis=0), metrics)
      # Every micro-batch's enqueued rows, micro-batch-major (the queue's order of keys
      # does not change ITC).
      enqueued = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), enqueued)

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    extra = objectives.after_update(extra, enqueued)

    losses = [v for k, v in metrics.items() if k.startswith("loss")]
    finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in losses] + [jnp.isfinite(grad_norm)]))
    updated = state.replace(step=state.step + 1, params=new_params, opt_state=opt_state,
                            extra=extra, nonfinite=jnp.zeros_like(state.nonfinite))
    skipped = state.replace(nonfinite=state.nonfinite + 1)
    new_state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), updated, skipped)
    new_state = new_state.replace(
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
    metrics = dict(metrics, grad_norm=grad_norm, lr=setup.lr_fn(state.step),
                   step=state.step, finite=finite, nonfinite=new_state.nonfinite,
                   nonfinite_total=new_state.nonfinite_total)
    return new_state, metrics

  return train_step


class JittedStep:
  """`train_step` compiled with explicit shardings and a donated state.

  Tracing happens under the mesh and logical-rule context (the model's activation
  constraints need it). `lower(state, batch)` exposes the AOT path (memory analysis).
  """

  def __init__(self, setup: TrainSetup, donate: bool = True):
    self.setup = setup
    replicated = NamedSharding(setup.mesh, P())
    self._fn = jax.jit(make_train_step(setup),
                       in_shardings=(setup.state_shardings,
                                     sharding.batch_sharding(setup.mesh, setup.config)),
                       out_shardings=(setup.state_shardings, replicated),
                       donate_argnums=(0,) if donate else ())

  def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    with sharding.activate(self.setup.mesh, self.setup.config):
      return self._fn(state, batch)

  def lower(self, state, batch):
    with sharding.activate(self.setup.mesh, self.setup.config):
      return self._fn.lower(state, batch)


def check_nonfinite(metrics: dict[str, Any], max_consecutive: int, batch_step: int) -> None:
  """Host side of the guard: raises after `max_consecutive` skipped steps in a row.
  `batch_step` is the loop's step (batches consumed) the metrics belong to."""
  consecutive = int(metrics["nonfinite"])
  if max_consecutive and consecutive >= max_consecutive:
    bad = {k: float(v) for k, v in metrics.items()
           if (k.startswith("loss") or k == "grad_norm") and not np.isfinite(float(v))}
    raise NonFiniteError(
        f"{consecutive} consecutive non-finite train steps (the last at step {batch_step}, "
        f"optimizer step {int(metrics['step'])}): {bad or 'non-finite values'}; the steps "
        f"were skipped and the state is the one before them")


def xla_cost(compiled) -> dict:
  """XLA's cost analysis of a compiled computation as one dict ({} where the backend has
  none). It counts a scanned layer stack's body once, not once per layer."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001  (not every backend reports costs)
    return {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})
