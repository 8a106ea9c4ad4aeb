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

Schedule (`cosine_step`, timm `CosineLRScheduler` as the official factory builds it): for
t < warmup: warmup_lr + t (base - warmup_lr) / warmup; then min_lr + (base - min_lr)
(1 + cos(pi t' / T)) / 2 with T = total - warmup and t' = t (official `warmup_prefix`
False: the cosine clock is not shifted by the warm-up) or t - warmup (`warmup_prefix`
True), and min_lr once t' >= T. Each group has its own base (lr * mult) but the same
warmup_lr and min_lr, as the official per-group schedule.
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
  o.schedule = "cosine_step"  # "cosine_step" | "constant"
  o.warmup_steps = 200        # official warmup_epochs: 200 (iterations)
  o.warmup_lr = 1e-6
  o.min_lr = 1e-6
  o.warmup_prefix = False     # official False: cosine clock not shifted by the warm-up
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


def cosine_step(base: float, o: ml_collections.ConfigDict, total_steps: int) -> Callable:
  """The official per-group schedule (see the module docstring)."""
  warmup, warmup_lr, min_lr = int(o.warmup_steps), float(o.warmup_lr), float(o.min_lr)
  t_initial = max(total_steps - warmup, 1)

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    warm = warmup_lr + t * (base - warmup_lr) / max(warmup, 1)
    tc = t - warmup if o.warmup_prefix else t
    cos = min_lr + 0.5 * (base - min_lr) * (1 + jnp.cos(math.pi * tc / t_initial))
    cos = jnp.where(tc >= t_initial, min_lr, cos)
    return jnp.where(t < warmup, warm, cos)

  return schedule


def make_schedule(base: float, o: ml_collections.ConfigDict, total_steps: int) -> Callable:
  if o.schedule == "constant":
    return optax.constant_schedule(base)
  if o.schedule == "cosine_step":
    return cosine_step(base, o, total_steps)
  raise ValueError(f"config.optimizer.schedule={o.schedule!r}: cosine_step | constant")


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
