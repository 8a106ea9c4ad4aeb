"""The pure, sharded train step: `train_step(state, batch) -> (state, metrics)`.

One optimizer step per call:
  1. rng = fold_in(state.rng, state.step)
  2. momentum model: ema <- m ema + (1 - m) params (official: before the momentum forward)
  3. loss and gradients, averaged over `optimizer.accum_steps` micro-batches (a scan; the
     batch is split strided so each device's rows stay on that device)
  4. AdamW update (parameter groups, schedule, clipping: optimizer.py)
  5. ITC queues <- momentum features of the global batch
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
from mplug2_jax.train import objectives
from mplug2_jax.train.state import Trainer, TrainState


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


def make_train_step(trainer: Trainer):
  """The un-jitted pure step for `trainer` (see `jit_train_step`)."""
  model, c, tx = trainer.model, trainer.objective, trainer.tx
  accum = int(trainer.opt_config.accum_steps)
  momentum = float(c.momentum)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    params = state.params
    ema = state.ema_params
    if ema:
      ema = jax.tree.map(lambda e, p: momentum * e + (1 - momentum) * p, ema,
                         objectives.momentum_subset(params))

    def loss_fn(p, micro, key):
      return objectives.compute(model, p, ema, state.queues, micro, key, c)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
      (_, (metrics, feats)), grads = grad_fn(params, batch, rng)
      ids = batch.get("image_ids")
    else:
      def body(total, xs):
        micro, key = xs
        (_, (m, f)), g = grad_fn(params, micro, key)
        return jax.tree.map(jnp.add, total, g), (m, f, micro.get("image_ids"))

      zeros = jax.tree.map(jnp.zeros_like, params)
      total, (metrics, feats, ids) = jax.lax.scan(
          body, zeros, (split_micro_batches(batch, accum), jax.random.split(rng, accum)))
      grads = jax.tree.map(lambda g: g / accum, total)
      metrics = jax.tree.map(lambda v: jnp.mean(v, axis=0), metrics)
      flat = lambda x: x.reshape(-1, *x.shape[2:])
      feats = None if feats is None else jax.tree.map(flat, feats)
      ids = None if ids is None else flat(ids)

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    queues = state.queues
    if feats is not None and queues:
      queues = objectives.enqueue(queues, feats[0], feats[1], ids)

    losses = [v for k, v in metrics.items() if k.startswith("loss")]
    finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in losses] + [jnp.isfinite(grad_norm)]))
    updated = state.replace(step=state.step + 1, params=new_params, opt_state=opt_state,
                            ema_params=ema, queues=queues,
                            nonfinite=jnp.zeros_like(state.nonfinite))
    skipped = state.replace(nonfinite=state.nonfinite + 1)
    new_state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), updated, skipped)
    new_state = new_state.replace(
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
    metrics = dict(metrics, grad_norm=grad_norm, lr=trainer.lr_fn(state.step),
                   step=state.step, finite=finite, nonfinite=new_state.nonfinite,
                   nonfinite_total=new_state.nonfinite_total)
    return new_state, metrics

  return train_step


class JittedStep:
  """`train_step` compiled with explicit shardings and a donated state.

  Tracing happens under the mesh and logical-rule context (the model's activation
  constraints need it). `lower(state, batch)` exposes the AOT path (memory analysis).
  """

  def __init__(self, trainer: Trainer, donate: bool = True):
    self.trainer = trainer
    replicated = NamedSharding(trainer.mesh, P())
    self._fn = jax.jit(make_train_step(trainer),
                       in_shardings=(trainer.state_shardings,
                                     sharding.batch_sharding(trainer.mesh, trainer.config)),
                       out_shardings=(trainer.state_shardings, replicated),
                       donate_argnums=(0,) if donate else ())

  def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    with sharding.activate(self.trainer.mesh, self.trainer.config):
      return self._fn(state, batch)

  def lower(self, state, batch):
    with sharding.activate(self.trainer.mesh, self.trainer.config):
      return self._fn.lower(state, batch)


def check_nonfinite(metrics: dict[str, Any], max_consecutive: int) -> None:
  """Host side of the guard: raises after `max_consecutive` skipped steps in a row."""
  consecutive = int(metrics["nonfinite"])
  if max_consecutive and consecutive >= max_consecutive:
    bad = {k: float(v) for k, v in metrics.items()
           if (k.startswith("loss") or k == "grad_norm") and not np.isfinite(float(v))}
    raise NonFiniteError(
        f"{consecutive} consecutive non-finite train steps (last at step "
        f"{int(metrics['step'])}): {bad or 'non-finite values'}; the steps were skipped and "
        f"the state is the one before them")
