"""Batch schemas: the names, shapes, dtypes and meaning of a task's batch arrays.

Each model family states its batches once (`<family>.batch_schema`); the input pipeline's
batches, the synthetic batches of timing runs and the stand-in batch of parameter init
are all checked against or made from that one statement.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mplug2_jax.tokens import IGNORE_INDEX

# What the values of a field are: synthetic data needs to know what makes them plausible.
KINDS = (
    "pixels",    # normalised images / video frames, float
    "ids",       # token ids; the first position is the family's start token
    "mask",      # 1 = real token, 0 = padding (matches the "ids" field of the same prefix)
    "labels",    # token targets, -100 where there is no loss
    "row_index", # index of the batch row an extra row belongs to (answers -> question)
    "weights",   # per-row loss weights
    "class",     # a class label
    "group",     # an id shared by rows that are positives of each other (ITC)
    "box",       # (cx, cy, w, h) in [0, 1]
    "flag",      # 0/1 per row (valid)
    "id",        # an integer identifier per row
)


class Field(NamedTuple):
  shape: tuple[int, ...]
  dtype: np.dtype
  kind: str


def zeros(schema: dict[str, Field]) -> dict[str, jax.Array]:
  """A batch of zeros (ids at 0, masks at 1): parameter init and `eval_shape`."""
  return {k: (jnp.ones if f.kind == "mask" else jnp.zeros)(f.shape, f.dtype)
          for k, f in schema.items()}


def shapes(schema: dict[str, Field]) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct(f.shape, f.dtype) for k, f in schema.items()}


def synthetic(schema: dict[str, Field], rng: np.random.Generator, *, vocab_size: int,
              start_id: int, first_word_id: int, num_classes: int = 1,
              full_length: bool = False) -> dict[str, np.ndarray]:
  """Random host arrays that follow `schema`: ids that start with `start_id` and draw the
  rest from [first_word_id, vocab_size), masks of random lengths (at least half of the
  row; the whole row with `full_length`), labels equal to the ids on real tokens, row
  indices that give every batch row the same number of extra rows."""
  out: dict[str, np.ndarray] = {}
  for name, f in schema.items():
    if f.kind == "pixels":
      out[name] = rng.normal(size=f.shape).astype(f.dtype)
    elif f.kind == "ids":
      n, length = f.shape
      ids = rng.integers(first_word_id, vocab_size, (n, length))
      ids[:, 0] = start_id
      lengths = (np.full(n, length) if full_length else
                 rng.integers(max(2, length // 2) if length > 1 else 1, length + 1, n))
      mask = np.arange(length)[None] < lengths[:, None]
      prefix = name[:-len("ids")]
      out[name] = np.where(mask, ids, 0).astype(f.dtype)
      out[prefix + "mask"] = mask.astype(schema[prefix + "mask"].dtype)
      if prefix + "labels" in schema:
        out[prefix + "labels"] = np.where(mask, ids, IGNORE_INDEX).astype(
            schema[prefix + "labels"].dtype)
    elif f.kind in ("mask", "labels"):
      continue  # made with their ids
    elif f.kind == "row_index":
      rows = f.shape[0]
      per = rows // _batch_rows(schema)
      out[name] = np.repeat(np.arange(rows // per), per).astype(f.dtype)
    elif f.kind in ("weights", "flag"):
      out[name] = np.ones(f.shape, f.dtype)
    elif f.kind == "class":
      out[name] = rng.integers(0, max(num_classes, 1), f.shape).astype(f.dtype)
    elif f.kind == "group":
      out[name] = rng.integers(0, 4 * f.shape[0], f.shape).astype(f.dtype)
    elif f.kind == "box":
      out[name] = rng.uniform(0.1, 0.9, f.shape).astype(f.dtype)
    elif f.kind == "id":
      out[name] = np.arange(f.shape[0]).astype(f.dtype)
    else:
      raise ValueError(f"schema field {name!r}: unknown kind {f.kind!r}; known: {KINDS}")
  return out


def _batch_rows(schema: dict[str, Field]) -> int:
  """The batch size: rows of the fields that are not extra rows."""
  return next(f.shape[0] for f in schema.values() if f.kind == "flag")


def check_batch(schema: dict[str, Field], batch: dict, what: str = "batch") -> None:
  """Raises ValueError naming the first array of `batch` that `schema` does not allow."""
  for name, f in schema.items():
    if name not in batch:
      raise ValueError(f"{what}: no {name!r} (schema: {sorted(schema)})")
    got = batch[name]
    if tuple(got.shape) != tuple(f.shape) or np.dtype(got.dtype) != np.dtype(f.dtype):
      raise ValueError(f"{what}: {name!r} is {got.dtype}{tuple(got.shape)}, the schema "
                       f"says {np.dtype(f.dtype)}{tuple(f.shape)}")
  extra = sorted(set(batch) - set(schema))
  if extra:
    raise ValueError(f"{what}: arrays {extra} are not in the schema {sorted(schema)}")
