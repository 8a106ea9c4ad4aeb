"""Grounding (mPLUG v1 scheme): 4 greedy box-coordinate tokens after the [unused339]
prefix, restricted to the coordinate tokens -> accuracy at IoU >= 0.5. The token scheme is
the one definition in `data/grounding.py`, shared with the training targets."""

from __future__ import annotations

import json

import numpy as np

from mplug2_jax.data import grounding as grounding_lib
from mplug2_jax.evaluate import common, metrics
from mplug2_jax.models import registry

MODEL_TASK = "grounding"
NEEDS_TOKENIZER = True


def predict(model_cfg, params, iterator, cfg, tok, log):
  prefix, coord_ids = grounding_lib.token_ids(tok)
  run = registry.of(model_cfg).predict.grounding(model_cfg, prefix, coord_ids)
  rows = []
  for batch, meta, valid in common.batches(iterator, cfg, log, "grounding"):
    bins = common.host_rows(run(params, batch["video"], batch["text_ids"], batch["text_mask"]))
    boxes = grounding_lib.dequantize(np.asarray(bins, np.float32))  # (cx, cy, w, h)
    gold = common.host_rows(batch["boxes"])
    for i in np.flatnonzero(valid):
      rows.append({"id": meta[i].get("id"), "pred_box": np.asarray(boxes[i]).tolist(),
                   "gold_box": gold[i].tolist()})
  return rows, None


def score(model_cfg, params, rows, extra, cfg, log):
  if not rows:
    raise ValueError("no valid examples were evaluated")
  pred = np.array([r["pred_box"] for r in rows])
  gold = np.array([r["gold_box"] for r in rows])
  return rows, {"accuracy_iou50": metrics.grounding_accuracy(pred, gold), "num": len(rows)}


def official_log_line(split: str, accuracy: float) -> str:
  """The official `eval_log.txt` line."""
  return json.dumps({f"{split}_set_accuracy": accuracy})
