"""The CLIP vision transformer of both families, with mPLUG-2's optional local temporal
modules (the video encoder).

Spec: `shared/spec/mplug2.md` section 2 (mPLUG-2), `shared/spec/owl2.md` section 2
(mPLUG-Owl2). Input video (B, T, H, W, 3) channels-last, CLIP-normalised; an image is a
video with T = 1. Output (B, 1 + T'·G², D): the mean over frames of the per-frame class
tokens, then every frame's patch tokens frame-major, after `ln_post` (with T = 1 the mean
is the class token itself, so an image gives post-LN on all its tokens, as Owl2's ViT).
The CLIP projection is not applied (neither family uses it).

Per block: LocalTemporal #1 on patch tokens -> pre-norm spatial self-attention within
each frame -> LocalTemporal #2 on patch tokens -> pre-norm QuickGELU MLP. Class tokens
skip the temporal modules. There is no temporal position embedding.

What differs between the families is configuration (`config.model.vision`): `ln_eps`
(CLIP 1e-5, Owl2 1e-6), `temporal_adapter` (Owl2: off), the MLP width (`mlp_dim`, else
`mlp_ratio` x width). The official fused q/k/v layouts (CLIP `[q;k;v]` blocks, Owl2's
per-head Megatron layout) are converters' business: the parameters here are separate
query/key/value kernels.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mplug2_jax.layers import activations, attentions, axes, linear, mlp, norms, stack

Array = Any


class LocalTemporal(nn.Module):
  """Bottleneck adapter with a depthwise 3-tap convolution along time.

  LN -> down (C -> C/2) -> depthwise temporal conv (zero padded) -> QuickGELU -> up.
  Initialised as the official module: PyTorch's default conv init, except `up`, which is
  zero, so a fresh module is an identity residual.
  """

  width: int
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:  # x: (B, T, P, C)
    bottleneck = self.width // 2
    h = norms.Norm(self.eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
    down_init = linear.torch_default_init(self.width)
    h = linear.Dense(bottleneck, kernel_axes=("embed", "mlp"), dtype=self.dtype,
                     param_dtype=self.param_dtype, kernel_init=down_init, bias_init=down_init,
                     name="down")(h)
    conv_init = linear.torch_default_init(3)  # depthwise: fan_in = 1 channel x 3 taps
    kernel = self.param("conv_kernel", axes.param_init(conv_init, ("conv_time", "mlp")),
                        (3, bottleneck), self.param_dtype).astype(self.dtype)
    bias = self.param("conv_bias", axes.param_init(conv_init, ("mlp",)),
                      (bottleneck,), self.param_dtype).astype(self.dtype)
    padded = jnp.pad(h, ((0, 0), (1, 1), (0, 0), (0, 0)))
    frames = h.shape[1]
    h = (kernel[0] * padded[:, 0:frames] + kernel[1] * padded[:, 1:frames + 1]
         + kernel[2] * padded[:, 2:frames + 2] + bias)
    h = activations.quick_gelu(h)
    return linear.Dense(self.width, kernel_axes=("mlp", "embed"), dtype=self.dtype,
                        param_dtype=self.param_dtype, kernel_init=nn.initializers.zeros_init(),
                        name="up")(h)


class VisionBlock(nn.Module):
  """One TemporalBlock; the scan carry is (B·T, 1 + G², C), frames inner."""

  cfg: ml_collections.ConfigDict
  frames: int
  attention: str = "xla"
  collect: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, _=None):
    cfg = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]

    def temporal(name, x):
      if not cfg.temporal_adapter:
        return x
      cls, patches = x[:, :1], x[:, 1:]
      p = patches.reshape(-1, self.frames, *patches.shape[1:])  # (B, T, G², C)
      p = p + LocalTemporal(width, cfg.ln_eps, name=name, **kw)(p)
      return jnp.concatenate([cls, p.reshape(patches.shape)], axis=1)

    x = temporal("temporal1", x)
    h = norms.Norm(cfg.ln_eps, name="attn_norm", **kw)(x)
    x = x + attentions.MultiHeadAttention(width // cfg.head_dim, cfg.head_dim, width,
                                      implementation=self.attention, name="attn", **kw)(h)
    x = temporal("temporal2", x)
    h = norms.Norm(cfg.ln_eps, name="mlp_norm", **kw)(x)
    x = x + mlp.Mlp(mlp_width(cfg), width, act="quick_gelu", name="mlp", **kw)(h)
    x = axes.constrain(x)
    return x, (x if self.collect else None)


class PatchEmbed(nn.Module):
  """The patch-embedding convolution (no bias): kernel (t_kernel, p, p, 3, width), stride
  (t_stride, p, p), zero padding t_pad in time -> (B, T', G, G, width).

  Patches do not overlap in space, so with one frame per kernel the convolution is one
  matmul over flattened p x p x 3 patches; that is what runs then, because XLA:CPU computes
  this convolution's kernel gradient inside an accumulation loop far slower than the
  equivalent matmul (docs/performance.md). The parameter is the convolution's either way.
  """

  width: int
  patch: int
  t_kernel: int = 1
  t_stride: int = 1
  t_pad: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, video: Array) -> Array:
    p = self.patch
    kernel = self.param(
        "kernel", axes.param_init(nn.initializers.lecun_normal(),
                                    ("conv_time", "conv_height", "conv_width", "conv_in", "embed")),
        (self.t_kernel, p, p, video.shape[-1], self.width), self.param_dtype).astype(self.dtype)
    if self.t_kernel == 1 and self.t_stride == 1 and self.t_pad == 0:
      b, t, h, w, c = video.shape
      gh, gw = h // p, w // p  # a remainder is dropped, as by a VALID convolution
      patches = video[:, :, :gh * p, :gw * p].reshape(b, t, gh, p, gw, p, c)
      return jnp.einsum("btgpwqc,pqcd->btgwd", patches, kernel[0])
    return jax.lax.conv_general_dilated(
        video, kernel, window_strides=(self.t_stride, p, p),
        padding=((self.t_pad, self.t_pad), (0, 0), (0, 0)),
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


class VideoEncoder(nn.Module):
  """The dual-vision encoder (CLIP ViT + local temporal modules).

  Returns `(tokens, aux)`; with `collect` set (parity tests) aux holds
  "vision_embeddings" (B·T', 1+G², C), the block input after `ln_pre`, and
  "vision_block_outputs" (L, B·T', 1+G², C); else it is empty.
  """

  cfg: ml_collections.ConfigDict  # config.model.vision
  remat_policy: str = "none"
  attention: str = "xla"
  collect: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, video: Array) -> tuple[Array, dict]:
    cfg = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width, p = cfg.width, cfg.patch_size
    video = video.astype(self.dtype)
    batch = video.shape[0]
    if cfg.temporal_downsampling:
      t_kernel, t_stride, t_pad = 3, cfg.temporal_stride, 1
    else:
      t_kernel, t_stride, t_pad = 1, 1, 0
    x = PatchEmbed(width, p, t_kernel, t_stride, t_pad, name="patch_embed", **kw)(video)
    frames, grid = x.shape[1], x.shape[2]
    x = x.reshape(batch * frames, grid * grid, width)
    cls = self.param("class_embedding", axes.param_init(nn.initializers.normal(0.02), ("embed",)),
                     (width,), self.param_dtype).astype(self.dtype)
    pos = self.param("positional_embedding",
                     axes.param_init(nn.initializers.normal(0.02), ("position", "embed")),
                     (1 + grid * grid, width), self.param_dtype).astype(self.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, width)), x], axis=1) + pos
    x = norms.Norm(cfg.ln_eps, name="ln_pre", **kw)(x)
    x = axes.constrain(x)
    embeddings = x

    blocks = stack.stack(VisionBlock, cfg.layers, self.remat_policy, broadcast_args=1)
    x, per_block = blocks(cfg, frames, self.attention, self.collect, name="blocks", **kw)(x, None)

    x = x.reshape(batch, frames, 1 + grid * grid, width)
    video_cls = jnp.mean(x[:, :, :1], axis=1)                            # (B, 1, C)
    patches = x[:, :, 1:].reshape(batch, frames * grid * grid, width)    # frame-major
    tokens = norms.Norm(cfg.ln_eps, name="ln_post", **kw)(
        jnp.concatenate([video_cls, patches], axis=1))
    aux = ({"vision_embeddings": embeddings, "vision_block_outputs": per_block}
           if self.collect else {})
    return axes.constrain(tokens), aux


def mlp_width(cfg: ml_collections.ConfigDict) -> int:
  """The blocks' MLP hidden width: `mlp_dim` when set (> 0), else `mlp_ratio` x width."""
  return int(cfg.get("mlp_dim", 0) or cfg.mlp_ratio * cfg.width)


def num_tokens(cfg: ml_collections.ConfigDict, image_size: int, frames: int) -> int:
  """Visual token count 1 + T'·G² for `frames` input frames of `image_size` pixels."""
  grid = image_size // cfg.patch_size
  if cfg.temporal_downsampling:
    frames = (frames + 2 - 3) // cfg.temporal_stride + 1
  return 1 + frames * grid * grid
