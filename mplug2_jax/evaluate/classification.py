"""Classification: the linear head on the video [CLS] -> top-1 / top-5 accuracy."""

from __future__ import annotations

import numpy as np

from mplug2_jax.evaluate import common, metrics
from mplug2_jax.models import registry

MODEL_TASK = "classification"


def predict(model_cfg, params, iterator, cfg, tok, log):
  classify = registry.of(model_cfg).predict.classify(model_cfg)
  rows = []
  for batch, meta, valid in common.batches(iterator, cfg, log, "classification"):
    logits = common.host_rows(classify(params, batch["video"]))
    labels = common.host_rows(batch["labels"])
    for i in np.flatnonzero(valid):
      top = np.argsort(-logits[i], kind="stable")[:5]
      rows.append({"video_id": meta[i].get("id"), "label": int(labels[i]),
                   "top5": top.tolist(), "_logits": logits[i]})
  return rows, None


def score(model_cfg, params, rows, extra, cfg, log):
  if not rows:
    raise ValueError("no valid examples were evaluated")
  logits = np.stack([r.pop("_logits") for r in rows])
  labels = np.array([r["label"] for r in rows])
  out = metrics.topk_accuracy(logits, labels, ks=(1, min(5, logits.shape[1])))
  out["num"] = len(rows)
  return rows, out
