"""AdamW with regex parameter groups, the official warm-up + cosine schedule, clipping.

Spec: `shared/spec/mplug2.md` section 10 (official `optim_factory.py`, `cosine_lr.py`).

Parameter groups. Every parameter gets a label from its path ("vision/blocks/attn/...")
by three regex lists, first match wins in each:
  frozen     -> the update is zero and no optimizer state is kept (`optax.set_to_zero`)
  lr_mults   -> base learning rate = lr * mult (official: the vision tower at lr2/lr1 = 0.1)
  no_decay   -> weight decay 0 (official: names containing `bias` or `LayerNorm.weight`)
Each distinct (lr multiplier, weight decay) pair is one AdamW of `optax.multi_transform`.

Two element-wise refinements (both off by default; mPLUG-Owl2 uses them, `configs/owl2_*.py`):
  partial      (regex, axis, trained indices): only these slices of a stacked parameter
               train, the other slices keep their values (gradients zeroed before clipping,
               updates zeroed after AdamW, so weight decay does not move them either).
               Owl2 stage 1 trains the image branch (index 1 on the modality axis) of the
               multiway K/V projections and norms while their text branch stays frozen.
  layer_decay  a layer-wise decayed lr for a scanned tower (BEiT-style): with n stacked
               blocks matched by `layer_decay_blocks` (leading axis = layer), block i
               (0-based) trains at decay^(n - i) times its group's lr, the parameters
               before the first block (`layer_decay_embed`) at decay^(n + 1), the rest at
               1. Adam's update is linear in the lr, so scaling the update is exactly a
               per-layer lr inside one stacked array.

Official "no decay" in our names: every `.../bias` (and the temporal adapters'
`conv_bias`), and the gains of the BERT LayerNorms (text encoder, fusion, decoder, MLM head:
`.../*norm/scale`). The official rule decays the CLIP LayerNorm gains (`ln_*`), the
temporal-adapter norms, `visn_emb_norm` / `visn_layer_norm` gains, the class/positional
embeddings, latents and the ITC temperature; `decay_clip_norms=False` exempts every norm
gain instead (the common modern choice).

Schedules (official `scheduler/cosine_lr.py` + `scheduler_factory.py`; spec sections 10,
13.3). Both are the timm `CosineLRScheduler` the official factories build, with its
`warmup_prefix=True` default (M2 `cosine_lr.py:36`, never overridden by
`scheduler_factory.py:29-63`): sched(t) = warmup_lr + t (base - warmup_lr) / W for t < W,
else min_lr + (base - min_lr) (1 + cos(pi (t - W) / T)) / 2, and min_lr once t - W >= T
(`cycle_limit` 1). `warmup_prefix=False` drops the "- W" (the cosine clock then starts at
t = 0 and sits at min_lr for the last W steps).

  cosine_step   t counts iterations, T = total - W (the official
                `num_iterations = epochs * iters - warmup`). The official scripts step the
                scheduler *after* each iteration with that iteration's index, so the
                optimizer step that ends iteration i uses sched(i - 1) (`lr_lag`; M2
                `video_qa_mplug2.py:81-98`). With `accum_steps` A the schedule's units are
                optimizer steps (W and T divided by A, as configs/caption.py sets them), and
                optimizer step k ends iteration A k + A - 1: lag gives sched(k + 1 - 2 / A)
                (k - 1 for A = 1, k for the caption's A = 2). `epoch0_dips` = S (official
                caption: 100, `video_caption_mplug2.py:62-63,107-110`): in epoch 0 the
                scheduler is stepped with i // S instead of i at iterations i that are
                multiples of S up to W * S, so the next step runs at a warm-up value.
  cosine_epoch  the pretraining `sched: cosine` (M1 `retrieval_img_mplug.py:43-44,77-78,396`,
                `pretrain_mplug_large.yaml`): t counts epochs, T = `epochs`, W =
                `warmup_steps` stairs. In epoch 0 the scheduler is stepped with i // S at
                every S-th iteration (S = `warmup_stair`, official 100) up to W * S, so
                iterations 100 s + 1 .. 100 (s + 1) run at sched(s) (the first 2,000
                iterations climb 20 stairs) and the rest of epoch 0 at sched(W) = base;
                epoch e >= 1 runs at sched(e + W) (stepped at the start of the epoch).

Each group has its own base (lr * mult) but the same warmup_lr and min_lr, as the
official per-group schedule.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

FROZEN = "frozen"

# The BERT towers whose LayerNorm gains the official rule exempts from weight decay.
OFFICIAL_NO_DECAY = (r"bias$", r"^(text_encoder|fusion|decoder|mlm_head)/.*norm/scale$")


def default_optimizer_config() -> ml_collections.ConfigDict:
  """`config.optimizer`: every key this module reads, with the official fine-tuning values."""
  o = ml_collections.ConfigDict()
  o.lr = 2e-5                 # lr1 (official fine-tuning); the base of every group
  o.lr_mults = (("^vision/", 0.1),)  # (regex, mult): official lr2 = 2e-6 for the vision tower
  o.weight_decay = 0.02
  o.no_decay = OFFICIAL_NO_DECAY     # regexes of parameters without weight decay
  o.decay_clip_norms = True   # official: CLIP / visn norm gains are decayed; False: no norm
                              # gain (`.../scale`) is decayed
  o.frozen = ()               # regexes of frozen parameters, e.g. ("^vision/",)
  o.b1 = 0.9                  # AdamW defaults (the YAML betas are not read officially)
  o.b2 = 0.999
  o.eps = 1e-8
  o.schedule = "cosine_step"  # "cosine_step" | "cosine_epoch" | "constant" (docstring)
  o.warmup_steps = 200        # W: official warmup_epochs (cosine_step: 200 iterations;
                              # cosine_epoch: 20 warm-up stairs)
  o.warmup_lr = 1e-6
  o.min_lr = 1e-6
  o.warmup_prefix = True      # official (timm copy's default): the cosine runs over t - W
                              # and reaches min_lr at the last step; False: over t
  o.lr_lag = True             # official: the scheduler steps after the iteration, so step
                              # k uses sched(k + 1 - 2 / accum_steps); False: sched(k)
  o.epoch0_dips = 0           # official caption: 100 (dips to warm-up values in epoch 0);
                              # 0 = none
  o.steps_per_epoch = 0       # optimizer steps per epoch (cosine_epoch, epoch0_dips)
  o.epochs = 0                # cosine_epoch: T in epochs (official `epochs`)
  o.warmup_stair = 100        # cosine_epoch: iterations per warm-up stair (official
                              # step_size 100)
  o.total_steps = 0           # optimizer steps of the run (0: config.total_steps)
  o.grad_clip_norm = 0.0      # global-norm clipping; 0 = none (official)
  o.accum_steps = 1           # micro-batches per optimizer step (official caption: 2)
  o.partial = ()              # ((regex, axis, (trained indices...)), ...): other slices frozen
  o.layer_decay = 1.0         # layer-wise lr decay of a scanned tower; 1.0 = off
  o.layer_decay_blocks = r"^vision/blocks/"  # stacked blocks (leading axis = layer)
  o.layer_decay_embed = r"^vision/(patch_embed|class_embedding|positional_embedding|ln_pre)/?"
  return o


def path_str(path) -> str:
  """'vision/blocks/attn/key/kernel' for a tree_util key path."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return "/".join(parts)


def _first(patterns, name: str):
  for i, pat in enumerate(patterns):
    if re.search(pat, name):
      return i
  return None


def group_of(name: str, o: ml_collections.ConfigDict) -> tuple[str, float, float]:
  """(label, lr multiplier, weight decay) of the parameter `name`."""
  if _first(tuple(o.frozen), name) is not None:
    return FROZEN, 0.0, 0.0
  mults = [tuple(m) for m in o.lr_mults]
  i = _first([p for p, _ in mults], name)
  mult = 1.0 if i is None else float(mults[i][1])
  no_decay = tuple(o.no_decay) + (() if o.decay_clip_norms else (r"/scale$",))
  wd = 0.0 if _first(no_decay, name) is not None else float(o.weight_decay)
  return f"lr{mult:g}_wd{wd:g}", mult, wd


def param_groups(params: Any, o: ml_collections.ConfigDict) -> dict[str, str]:
  """{parameter path: label}: the report logged at start-up and used by tests."""
  return {path_str(p): group_of(path_str(p), o)[0]
          for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}


def _cosine(base: float, o: ml_collections.ConfigDict, warmup: float, t_initial: float,
            t) -> jax.Array:
  """sched(t) of the timm scheduler (module docstring), t a float array."""
  warmup_lr, min_lr = float(o.warmup_lr), float(o.min_lr)
  warm = warmup_lr + t * (base - warmup_lr) / max(warmup, 1e-12)
  tc = t - warmup if o.warmup_prefix else t
  cos = min_lr + 0.5 * (base - min_lr) * (1 + jnp.cos(math.pi * tc / t_initial))
  cos = jnp.where(tc >= t_initial, min_lr, cos)
  return jnp.where(t < warmup, warm, cos)


def cosine_step(base: float, o: ml_collections.ConfigDict, total_steps: int) -> Callable:
  """The official per-iteration schedule of one group (module docstring), as a function of
  the optimizer step count."""
  warmup = int(o.warmup_steps)
  t_initial = max(total_steps - warmup, 1)
  accum = int(o.accum_steps)
  dips, per_epoch = int(o.epoch0_dips), int(o.steps_per_epoch)
  if dips and per_epoch <= 0:
    raise ValueError("config.optimizer.epoch0_dips needs optimizer.steps_per_epoch > 0")

  def schedule(count):
    count = jnp.asarray(count, jnp.int32)
    # The iteration whose scheduler step set this optimizer step's lr.
    i = accum * count + (accum - 2 if o.lr_lag else 0)
    i = jnp.maximum(i, 0)
    if dips:
      dip = (i < accum * per_epoch) & (i % dips == 0) & (i <= warmup * accum * dips)
      i = jnp.where(dip, i // dips, i)
    t = i.astype(jnp.float32) / accum
    return _cosine(base, o, warmup, t_initial, t)

  return schedule


def cosine_epoch(base: float, o: ml_collections.ConfigDict) -> Callable:
  """The official per-epoch pretraining schedule of one group (module docstring)."""
  per_epoch, epochs, stair = int(o.steps_per_epoch), int(o.epochs), int(o.warmup_stair)
  warmup = int(o.warmup_steps)
  if per_epoch <= 0 or epochs <= 0 or stair <= 0:
    raise ValueError("config.optimizer.schedule='cosine_epoch' needs optimizer."
                     "steps_per_epoch, epochs and warmup_stair > 0")

  def schedule(count):
    count = jnp.asarray(count, jnp.int32)
    epoch = count // per_epoch
    # Epoch 0: iteration n runs at the stair set after iteration n - 1.
    stair_t = jnp.clip((count + stair - 1) // stair - 1, 0, warmup)
    t = jnp.where(epoch == 0, stair_t, epoch + warmup).astype(jnp.float32)
    return _cosine(base, o, warmup, epochs, t)

  return schedule


SCHEDULES = ("cosine_step", "cosine_epoch", "constant")


def make_schedule(base: float, o: ml_collections.ConfigDict, total_steps: int) -> Callable:
  if o.schedule == "constant":
    return optax.constant_schedule(base)
  if o.schedule == "cosine_step":
    return cosine_step(base, o, total_steps)
  if o.schedule == "cosine_epoch":
    return cosine_epoch(base, o)
  raise ValueError(f"config.optimizer.schedule={o.schedule!r}: one of {SCHEDULES}")


def _leaf_shape(leaf) -> tuple[int, ...]:
  return tuple(getattr(leaf, "shape", ()))


def slice_mask(name: str, shape: tuple[int, ...], o: ml_collections.ConfigDict):
  """0/1 float array broadcastable to `shape` (1 on trained slices) for a parameter named
  by `o.partial`, else None."""
  for entry in o.partial:
    pattern, axis, indices = entry
    if re.search(pattern, name):
      axis = int(axis)
      if not -len(shape) <= axis < len(shape):
        raise ValueError(f"config.optimizer.partial: {name} has shape {shape}, no axis {axis}")
      axis %= len(shape)
      bad = [i for i in indices if not 0 <= int(i) < shape[axis]]
      if bad:
        raise ValueError(f"config.optimizer.partial: indices {bad} out of range for axis "
                         f"{axis} of {name} {shape}")
      mask = np.zeros([shape[axis] if d == axis else 1 for d in range(len(shape))], np.float32)
      np.moveaxis(mask, axis, 0)[[int(i) for i in indices]] = 1.0
      return mask
  return None


def layer_scale(name: str, shape: tuple[int, ...], o: ml_collections.ConfigDict, layers: int):
  """The layer-wise lr factor of a parameter (array for stacked blocks), or None."""
  decay = float(o.layer_decay)
  if decay == 1.0 or layers == 0:
    return None
  if re.search(o.layer_decay_blocks, name):
    n = shape[0]
    scale = decay ** (n - np.arange(n, dtype=np.float64))
    return scale.reshape((n,) + (1,) * (len(shape) - 1)).astype(np.float32)
  if o.layer_decay_embed and re.search(o.layer_decay_embed, name):
    return np.float32(decay ** (layers + 1))
  return None


def update_scales(o: ml_collections.ConfigDict, params: Any) -> tuple[Any, Any] | None:
  """(gradient masks, update scales): trees of arrays broadcastable to each parameter
  (1.0 where nothing applies), or None when neither `partial` nor `layer_decay` is set."""
  if not o.partial and float(o.layer_decay) == 1.0:
    return None
  if not 0.0 < float(o.layer_decay) <= 1.0:
    raise ValueError(f"config.optimizer.layer_decay={o.layer_decay}: must be in (0, 1]")
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [path_str(p) for p, _ in leaves]
  layers = max((_leaf_shape(v)[0] for n, (_, v) in zip(names, leaves)
                if re.search(o.layer_decay_blocks, n) and _leaf_shape(v)), default=0)
  masks, scales = [], []
  for name, (_, leaf) in zip(names, leaves):
    shape = _leaf_shape(leaf)
    mask = slice_mask(name, shape, o)
    scale = layer_scale(name, shape, o, layers)
    masks.append(np.float32(1.0) if mask is None else mask)
    total = (np.float32(1.0) if mask is None else mask) * (
        np.float32(1.0) if scale is None else scale)
    scales.append(np.asarray(total, np.float32))
  return (jax.tree_util.tree_unflatten(treedef, masks),
          jax.tree_util.tree_unflatten(treedef, scales))


def scale_elementwise(factors: Any) -> optax.GradientTransformation:
  """Multiplies every update by its (broadcast) factor; stateless."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, f: (u * f).astype(u.dtype), updates, factors), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make(o: ml_collections.ConfigDict, params: Any,
         total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
  """(tx, lr_fn): the optimizer for `params` (arrays or shapes) and the lr of the main group.

  Gradient accumulation is done by the train step (a scan over micro-batches), not here,
  so `tx` sees one averaged gradient per optimizer step.
  """
  total = int(o.total_steps or total_steps)
  if o.schedule == "cosine_step" and total <= 0:
    raise ValueError("config.optimizer.total_steps (or config.total_steps) must be > 0")
  labels_flat, transforms = [], {}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  for path, _ in leaves:
    label, mult, wd = group_of(path_str(path), o)
    labels_flat.append(label)
    if label in transforms:
      continue
    if label == FROZEN:
      transforms[label] = optax.set_to_zero()
    else:
      transforms[label] = optax.adamw(make_schedule(o.lr * mult, o, total), b1=o.b1, b2=o.b2,
                                      eps=o.eps, weight_decay=wd)
  labels = jax.tree_util.tree_unflatten(treedef, labels_flat)
  tx = optax.multi_transform(transforms, labels)
  scales = update_scales(o, params)
  if scales is not None:
    tx = optax.chain(tx, scale_elementwise(scales[1]))
  if o.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  if scales is not None:  # frozen slices give no gradient (so no clipping share)
    tx = optax.chain(scale_elementwise(scales[0]), tx)
  return tx, make_schedule(o.lr, o, total)
