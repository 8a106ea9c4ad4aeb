"""Resizing a learned ViT positional table to another patch grid (both families' CLIP
initialisations: mPLUG-2 at another resolution, mPLUG-Owl2's 448 px ViT from a 224 /
336 px CLIP)."""

from __future__ import annotations

import numpy as np


def resize_positional_embedding(table: np.ndarray, grid: int) -> np.ndarray:
  """(1 + g², C) -> (1 + grid², C): bilinear on the patch grid, class entry kept.

  Same arithmetic as `F.interpolate(mode="bilinear", align_corners=False)` that the
  official mPLUG-2 loader uses (its `models/vit.py:208-225`): half-pixel centres, source
  clamped at 0.
  """
  cls, patches = table[:1], table[1:]
  old = int(round(np.sqrt(patches.shape[0])))
  if old * old != patches.shape[0]:
    raise ValueError(f"positional embedding with {patches.shape[0]} patch rows is not a "
                     f"square grid")
  if old == grid:
    return table

  def weights(n_in: int, n_out: int) -> np.ndarray:
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    w = np.zeros((n_out, n_in), np.float64)
    w[np.arange(n_out), lo] += 1 - frac
    w[np.arange(n_out), hi] += frac
    return w

  w = weights(old, grid)
  image = patches.reshape(old, old, -1).astype(np.float64)
  resized = np.einsum("ai,bj,ijc->abc", w, w, image).reshape(grid * grid, -1)
  return np.concatenate([cls, resized.astype(table.dtype)], axis=0)
