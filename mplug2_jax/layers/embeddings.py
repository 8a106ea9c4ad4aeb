"""Position encodings computed, not learned: rotary embeddings and fixed sin-cos tables."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
  """theta^(-2i / head_dim), i = 0 .. head_dim/2 - 1 (float32, as LLaMA's `inv_freq`)."""
  return (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)).astype(
      np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding in the split-halves (GPT-NeoX / HF LLaMA) convention.

  x (B, T, N, H), positions (B, T) integers. With angles a = position * inv_freq (H/2 of
  them) duplicated to [a, a], `x' = x * cos + rotate_half(x) * sin` where
  `rotate_half(x) = [-x[H/2:], x[:H/2]]`. Angles, cos and sin are float32.
  """
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f"rotary embeddings need an even head size, got {head_dim}")
  inv_freq = jnp.asarray(rope_inv_freq(head_dim, theta))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq          # (B, T, H/2)
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]    # (B, T, 1, H)
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  half = head_dim // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def sincos_1d(positions: np.ndarray, dim: int) -> np.ndarray:
  """Fixed 1-D table: row p = [sin(p * omega), cos(p * omega)], omega_i =
  10000^(-i / (dim/2)), i = 0 .. dim/2 - 1 (all sines first, then all cosines).

  Computed in float32 step by step as the MAE helper that mPLUG-Owl2 uses
  (`visual_encoder.py`), so the tables equal the official buffers bit for bit."""
  if dim % 2:
    raise ValueError(f"a sin-cos table needs an even width, got {dim}")
  omega = np.arange(dim // 2, dtype=np.float32)
  omega /= np.float32(dim / 2.0)
  omega = np.float32(1.0) / np.float32(10000) ** omega
  angles = np.asarray(positions, np.float32).reshape(-1)[:, None] * omega[None]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def sincos_2d(grid: int, dim: int, cls_token: bool = False) -> np.ndarray:
  """Fixed 2-D table over a grid x grid patch grid in row-major order: each row is
  [T(column), T(row)], T = `sincos_1d` with dim/2 channels; an all-zero first row for a
  class token when `cls_token`."""
  if dim % 4:
    raise ValueError(f"a 2-D sin-cos table needs a width divisible by 4, got {dim}")
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  table = np.concatenate([sincos_1d(cols, dim // 2), sincos_1d(rows, dim // 2)], axis=1)
  if cls_token:
    table = np.concatenate([np.zeros((1, dim), np.float32), table], axis=0)
  return table.astype(np.float32)
