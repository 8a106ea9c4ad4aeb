"""Question answering: open generation (official: beam 5, 1-10 tokens) -> exact match
(MSRVTT-QA / MSVD-QA) or VQA accuracy; or answer-list ranking (`qa_mode="rank"`, official
`rank_answer`, spec 6.2)."""

from __future__ import annotations

import json

import numpy as np
from etils import epath

from mplug2_jax.evaluate import common, metrics
from mplug2_jax.models import registry

MODEL_TASK = "videoqa"
NEEDS_TOKENIZER = True
QA_MODES = ("generate", "rank")


def load_answer_list(path_or_list) -> list[str]:
  """Answer list: JSON {answer: index} (keys in file order, official) or [answer]."""
  if isinstance(path_or_list, (list, tuple)):
    return [str(a) for a in path_or_list]
  data = json.loads(epath.Path(path_or_list).read_text(encoding="utf-8"))
  return [str(a) for a in (data.keys() if isinstance(data, dict) else data)]


def encode_answer_list(tok, answers: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """`[CLS] answer [SEP]` ids and mask, padded to the longest (never truncated)."""
  from mplug2_jax.data import text as text_lib

  length = max(len(tok.encode(a + "[SEP]")) for a in answers)
  rows = [text_lib.encode_answer(tok, a, length) for a in answers]
  return (np.stack([r["answer_ids"] for r in rows]), np.stack([r["answer_mask"] for r in rows]))


def predict(model_cfg, params, iterator, cfg, tok, log):
  if cfg.qa_mode not in QA_MODES:
    raise ValueError(f"eval.qa_mode={cfg.qa_mode!r}: must be one of {QA_MODES}")
  predictors = registry.of(model_cfg).predict
  rank = cfg.qa_mode == "rank"
  if rank:
    if not cfg.answer_list:
      raise ValueError("eval.qa_mode='rank' needs eval.answer_list")
    answers = load_answer_list(cfg.answer_list)
    run = predictors.videoqa_rank(model_cfg, cfg, *encode_answer_list(tok, answers))
  else:
    run = predictors.videoqa_generate(model_cfg, cfg)
  rows = []
  for batch, meta, valid in common.batches(iterator, cfg, log, "videoqa"):
    out = common.host_rows(run(params, batch["video"], batch["text_ids"], batch["text_mask"]))
    qids = common.host_rows(batch["question_id"])
    for i in np.flatnonzero(valid):
      pred = answers[int(out[i])] if rank else tok.decode_prediction(out[i].tolist())
      rows.append({"question_id": int(qids[i]), "video_id": meta[i].get("id"),
                   "pred_answer": pred, "gold_answer": list(meta[i].get("gold", []))})
  return rows, None


def vqa_golds(rows, cfg) -> list[list[str]]:
  """Human answers per question: from `eval.gold_file` (the 10 answers), else the record's
  answers (the built VQA records keep distinct answers only, so that is approximate)."""
  if not cfg.gold_file:
    return [r["gold_answer"] for r in rows]
  gold = json.loads(epath.Path(cfg.gold_file).read_text(encoding="utf-8"))
  table = {int(a["question_id"]): a["answer"] for a in gold if "answer" in a}
  golds = []
  for r in rows:
    if r["question_id"] not in table:
      raise KeyError(f"question_id {r['question_id']} is not in {cfg.gold_file}")
    g = table[r["question_id"]]
    golds.append([g] if isinstance(g, str) else list(g))
  return golds


def score(model_cfg, params, rows, extra, cfg, log):
  if not rows:
    raise ValueError("no valid examples were evaluated")
  preds = [r["pred_answer"] for r in rows]
  if cfg.qa_metric == "vqa":
    return rows, {"vqa_accuracy": metrics.vqa_accuracy(
        preds, vqa_golds(rows, cfg), normalization=cfg.vqa_normalization), "num": len(rows)}
  golds = [r["gold_answer"][0] if r["gold_answer"] else "" for r in rows]
  return rows, {"accuracy": metrics.exact_match_accuracy(preds, golds), "num": len(rows)}
