"""Captioning: cached beam search (official: beam 5, 4-20 tokens), decoded, the text after
the last prompt kept (spec 6.1) -> COCO caption metrics (BLEU, METEOR, ROUGE-L, CIDEr)."""

from __future__ import annotations

import numpy as np

from mplug2_jax.evaluate import common, metrics
from mplug2_jax.models import registry

MODEL_TASK = "caption"
NEEDS_TOKENIZER = True


def predict(model_cfg, params, iterator, cfg, tok, log):
  generate = registry.of(model_cfg).predict.caption(model_cfg, cfg)
  rows = []
  for batch, meta, valid in common.batches(iterator, cfg, log, "caption"):
    ids = common.host_rows(generate(params, batch["video"]))
    for i in np.flatnonzero(valid):
      text = tok.decode_prediction(ids[i].tolist())
      rows.append({"video_id": meta[i].get("id"),
                   "pred_caption": metrics.strip_prompt(text, cfg.prompt),
                   "gold_caption": list(meta[i].get("gold", []))})
  return rows, None


def score(model_cfg, params, rows, extra, cfg, log):
  if not rows:
    raise ValueError("no valid examples were evaluated")
  keys = [str(i) for i in range(len(rows))]
  return rows, metrics.caption_metrics({k: r["pred_caption"] for k, r in zip(keys, rows)},
                                       {k: r["gold_caption"] for k, r in zip(keys, rows)})
