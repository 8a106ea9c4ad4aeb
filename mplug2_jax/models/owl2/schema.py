"""mPLUG-Owl2 batches: fixed shapes, images assigned to placeholders by their slot.

  input_ids      i32 (B, L)  token ids; -200 (`tokens.IMAGE_TOKEN_INDEX`) is an image
                             placeholder; padding (left or right) with any id, mask 0
  attention_mask i32 (B, L)  1 = real token (placeholders included), 0 = padding
  labels         i32 (B, L)  targets, -100 where there is no loss (prompt, placeholders,
                             padding); the loss compares position t's logits with t+1
  images         f32 (B, K, S, S, 3)  CLIP-normalised, channels-last image slots
  image_mask     i32 (B, K)  1 = slot k of sample b holds the image of that sample's k-th
                             placeholder (counted left to right); 0 = empty slot
  valid          i32 (B,)    0 = evaluation padding or a replaced bad sample (the input
                             pipeline's flag; the model does not read it)
  question_id    i32 (B,)    the record's question id (evaluation), else -1

L is `data.max_length`, K `data.images_per_sample`, S `data.image_size` (0: the model's).
The slot layout is the explicit image -> (sample, placeholder) assignment: a sample
without placeholders (text-only, also inside a batch with images) uses no image and shifts
no other sample's images (official bug 11), and every array splits along its first axis
(data parallelism, micro-batches). `check_images` verifies, on the host, that the
placeholders of each sample and its filled slots agree. With K = 0 there is no image
array: the vision tower is not run (the official `images=None` path).
"""

from __future__ import annotations

import ml_collections
import numpy as np

from mplug2_jax.models.owl2 import config as owl2_config
from mplug2_jax.models.schema import Field
from mplug2_jax.tokens import IGNORE_INDEX, IMAGE_TOKEN_INDEX

I32, F32 = np.dtype(np.int32), np.dtype(np.float32)
DATA_TASKS = ("instruct",)


def batch_schema(model_cfg: ml_collections.ConfigDict, data_cfg: ml_collections.ConfigDict,
                 batch_size: int, task: str = "") -> dict[str, Field]:
  """The arrays of one batch (see the module doc)."""
  task = task or data_cfg.get("task", "") or model_cfg.task
  if task not in DATA_TASKS:
    raise ValueError(f"no mPLUG-Owl2 batch schema for task {task!r}; known: {DATA_TASKS}")
  b = batch_size
  length = int(data_cfg.get("max_length", 0) or 0)
  if length <= 0:
    raise ValueError(f"data.max_length={length}: an Owl2 batch needs a positive length")
  slots = int(data_cfg.get("images_per_sample", 1))
  size = int(data_cfg.get("image_size", 0) or model_cfg.image_size)
  s = {"input_ids": Field((b, length), I32, "ids"),
       "attention_mask": Field((b, length), I32, "mask"),
       "labels": Field((b, length), I32, "labels")}
  if slots:
    s["images"] = Field((b, slots, size, size, 3), F32, "pixels")
    s["image_mask"] = Field((b, slots), I32, "flag")
  s["valid"] = Field((b,), I32, "flag")
  s["question_id"] = Field((b,), I32, "id")
  return s


def expanded_length(model_cfg: ml_collections.ConfigDict, length: int, slots: int) -> int:
  """The LLM sequence length of a batch: every placeholder slot may add its image's
  tokens minus the placeholder itself (static, so it compiles once per batch shape)."""
  return length + slots * (owl2_config.tokens_per_image(model_cfg) - 1)


def check_images(batch: dict, what: str = "batch") -> None:
  """Raises ValueError naming the first sample whose placeholders and image slots
  disagree: sample b's k-th placeholder needs `image_mask[b, k] = 1`, and filled slots
  must be the first ones (one per placeholder, none left over)."""
  ids = np.asarray(batch["input_ids"])
  mask = np.asarray(batch["attention_mask"])
  placeholders = ((ids == IMAGE_TOKEN_INDEX) & (mask != 0)).sum(axis=1)
  if ((ids == IMAGE_TOKEN_INDEX) & (mask == 0)).any():
    row = int(np.flatnonzero(((ids == IMAGE_TOKEN_INDEX) & (mask == 0)).any(axis=1))[0])
    raise ValueError(f"{what}: sample {row} has an image placeholder under attention_mask 0")
  if "image_mask" not in batch:
    if placeholders.any():
      row = int(np.flatnonzero(placeholders)[0])
      raise ValueError(f"{what}: sample {row} has {placeholders[row]} image placeholders "
                       "but the batch has no images")
    return
  filled = np.asarray(batch["image_mask"]).astype(bool)
  slots = filled.shape[1]
  for row in range(ids.shape[0]):
    want = np.arange(slots) < placeholders[row]
    if placeholders[row] > slots or not np.array_equal(filled[row], want):
      raise ValueError(
          f"{what}: sample {row} has {placeholders[row]} image placeholders but image_mask "
          f"{filled[row].astype(int).tolist()} (slot k holds the k-th placeholder's image; "
          f"{slots} slots)")


def synthetic(model_cfg: ml_collections.ConfigDict, schema: dict[str, Field],
              rng: np.random.Generator, full_length: bool = False) -> dict[str, np.ndarray]:
  """Random batch of `schema`: BOS, random text with 0..K placeholders at random places
  (the first row fills every slot), right padding to a random length (full with
  `full_length`), labels on the text after the last placeholder."""
  b, length = schema["input_ids"].shape
  slots = schema["images"].shape[1] if "images" in schema else 0
  t = model_cfg.llm
  ids = rng.integers(3, t.vocab_size, (b, length))
  ids[:, 0] = t.bos_token_id
  lo = min(length, max(2, slots + 2, length // 2))
  lengths = np.full(b, length) if full_length else rng.integers(lo, length + 1, b)
  image_mask = np.zeros((b, slots), np.int32)
  labels = np.full((b, length), IGNORE_INDEX)
  for row in range(b):
    n = lengths[row]
    count = slots if row == 0 else int(rng.integers(0, slots + 1))
    count = min(count, n - 1)
    where = np.sort(rng.choice(np.arange(1, n), count, replace=False)) if count else []
    ids[row, where] = IMAGE_TOKEN_INDEX
    image_mask[row, :count] = 1
    start = (where[-1] + 1) if count else 1
    labels[row, start:n] = ids[row, start:n]
  real = np.arange(length)[None] < lengths[:, None]
  out = {"input_ids": np.where(real, ids, t.pad_token_id).astype(np.int32),
         "attention_mask": real.astype(np.int32), "labels": labels.astype(np.int32),
         "valid": np.ones(b, np.int32), "question_id": np.full(b, -1, np.int32)}
  if slots:
    out["images"] = rng.normal(size=schema["images"].shape).astype(np.float32)
    out["image_mask"] = image_mask
  return out
