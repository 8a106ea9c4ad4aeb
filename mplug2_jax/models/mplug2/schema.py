"""mPLUG-2 batches: every array of every task, from the model and data configs.

  every task     video f32 (B, T, S, S, 3) [data task "text": none], valid i32 (B,)
                 (0 = eval padding or a replaced bad sample), question_id i32 (B,)
  caption        caption_ids, caption_mask, caption_labels i32 (B, max_caption_len)
  videoqa        text_ids, text_mask (B, max_question_len); answer_ids, answer_mask,
                 answer_labels (B*K, max_answer_len); answer_question_index i32 (B*K,),
                 answer_weights f32 (B*K,); K = answers_per_question
  retrieval,     text_ids, text_mask (B, max_text_len); image_ids i32 (B,) (ITC pair ids)
  pretrain, text pretrain also caption_ids, caption_mask, caption_labels (B, max_caption_len)
                 (the prefix-LM targets) unless data.pretrain_lm_targets = "text"
  grounding      text_ids, text_mask (B, max_text_len) = [CLS] expression [SEP];
                 boxes f32 (B, 4) (cx, cy, w, h) / S; answer_ids, answer_mask,
                 answer_labels (B, 5) = [unused339] + 4 box tokens (data/grounding.py),
                 answer_question_index i32 (B,), answer_weights f32 (B,)
  classification labels i32 (B,)

T and S are `data.num_frames` / `data.image_size`, or the model's when those are 0.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from mplug2_jax.models.schema import Field

I32, F32 = np.dtype(np.int32), np.dtype(np.float32)
BOX_ANSWER_LENGTH = 5  # [unused339] + 4 coordinate tokens, no end token
DATA_TASKS = ("caption", "videoqa", "retrieval", "pretrain", "grounding", "classification",
              "text")


def _text(prefix: str, rows: int, length: int, labels: bool = False) -> dict[str, Field]:
  out = {f"{prefix}_ids": Field((rows, length), I32, "ids"),
         f"{prefix}_mask": Field((rows, length), I32, "mask")}
  if labels:
    out[f"{prefix}_labels"] = Field((rows, length), I32, "labels")
  return out


def batch_schema(model_cfg: ml_collections.ConfigDict, data_cfg: ml_collections.ConfigDict,
                 batch_size: int, task: str = "") -> dict[str, Field]:
  """The arrays of one batch of `task` (default: data.task, else model.task)."""
  task = task or data_cfg.get("task", "") or model_cfg.task
  if task not in DATA_TASKS:
    raise ValueError(f"no mPLUG-2 batch schema for task {task!r}; known: {DATA_TASKS}")
  b, d = batch_size, data_cfg
  frames = int(d.get("num_frames", 0) or model_cfg.num_frames)
  size = int(d.get("image_size", 0) or model_cfg.image_size)
  s: dict[str, Field] = {}
  if task != "text":
    s["video"] = Field((b, frames, size, size, 3), F32, "pixels")
  if task == "caption":
    s.update(_text("caption", b, d.max_caption_len, labels=True))
  elif task in ("videoqa", "grounding"):
    qa = task == "videoqa"
    s.update(_text("text", b, d.max_question_len if qa else d.max_text_len))
    rows = b * (d.answers_per_question if qa else 1)
    s.update(_text("answer", rows, d.max_answer_len if qa else BOX_ANSWER_LENGTH, labels=True))
    s["answer_question_index"] = Field((rows,), I32, "row_index")
    s["answer_weights"] = Field((rows,), F32, "weights")
    if not qa:
      s["boxes"] = Field((b, 4), F32, "box")
  elif task in ("retrieval", "pretrain", "text"):
    s.update(_text("text", b, d.max_text_len))
    s["image_ids"] = Field((b,), I32, "group")
    if task == "pretrain" and d.get("pretrain_lm_targets", "caption") == "caption":
      s.update(_text("caption", b, d.max_caption_len, labels=True))
  elif task == "classification":
    s["labels"] = Field((b,), I32, "class")
  s["question_id"] = Field((b,), I32, "id")
  s["valid"] = Field((b,), I32, "flag")
  return s
