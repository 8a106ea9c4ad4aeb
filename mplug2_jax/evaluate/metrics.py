"""Evaluation metrics: pure functions of predictions and references (host-side numpy).

  caption_metrics          BLEU-1..4, METEOR, ROUGE-L, CIDEr (SPICE optional) through
                           `pycocoevalcap` with its PTB tokenizer (needs Java on PATH)
  vqa_accuracy             the VQA accuracy with the standard answer normalisation
  exact_match_accuracy     MSRVTT-QA / MSVD-QA: exact string equality (official, no normalisation)
  retrieval_metrics        t2v / v2t R@1/5/10, median and mean rank from a score matrix
  itm_rerank               ITC top-k shortlist re-scored by ITM (ALBEF / mPLUG retrieval)
  topk_accuracy            classification top-1 / top-5
  grounding_accuracy       share of predicted boxes with IoU >= 0.5

Spec: `shared/spec/mplug2.md` sections 6 and 14, `shared/spec/datasets.md` sections 2 and 3.
Percentages are returned in [0, 100] for recall / accuracy (as the papers report them);
caption metrics keep the COCO evaluator's scale (CIDEr 0.803 = "80.3").
"""

from __future__ import annotations

import re
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np

# --------------------------------------------------------------------------------------
# Captioning (COCO caption evaluator).
# --------------------------------------------------------------------------------------

CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def require_java(what: str) -> None:
  """Java is optional for everything but the caption metrics; say which metric needs it."""
  import shutil

  if shutil.which("java") is None:
    raise RuntimeError(f"{what} need Java on PATH, and `java` is not found: install a JRE "
                       "(e.g. `apt-get install default-jre-headless`, or `conda install "
                       "openjdk` without root) or evaluate another task")


def caption_metrics(predictions: Mapping[Hashable, str],
                    references: Mapping[Hashable, Sequence[str]], *, spice: bool = False,
                    per_item: bool = False) -> dict:
  """COCO caption metrics of `predictions` {id: caption} against `references` {id: [gold]}.

  Both sides are PTB-tokenised (lower-cased, punctuation removed) by pycocoevalcap's
  Stanford tokenizer, as the standard COCO evaluator does. Every id must have a
  prediction and at least one reference. Returns {"Bleu_1": ..., "CIDEr": ..., "num": N}
  (and "per_item": {metric: [score per id, in sorted id order]} with `per_item`).
  """
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.meteor.meteor import Meteor
  from pycocoevalcap.rouge.rouge import Rouge
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

  if set(predictions) != set(references):
    missing = sorted(map(str, set(references) - set(predictions)))[:5]
    extra = sorted(map(str, set(predictions) - set(references)))[:5]
    raise ValueError(f"predictions and references have different ids (missing predictions "
                     f"{missing}, predictions without references {extra})")
  if not predictions:
    raise ValueError("no predictions to score")
  # pycocoevalcap indexes by its own keys: use positions so that any id type works.
  ids = sorted(predictions, key=str)
  for i in ids:
    if not references[i]:
      raise ValueError(f"id {i!r} has no reference caption")
  require_java("caption metrics (BLEU, METEOR, ROUGE-L, CIDEr: pycocoevalcap's PTB "
               "tokenizer and METEOR)")
  tokenizer = PTBTokenizer()
  gts = tokenizer.tokenize({k: [{"caption": _one_line(c)} for c in references[i]]
                            for k, i in enumerate(ids)})
  res = tokenizer.tokenize({k: [{"caption": _one_line(predictions[i])}]
                            for k, i in enumerate(ids)})
  # METEOR's jar reads one line per hypothesis; an empty one is scored as a lone space.
  res = {k: [r if r.strip() else "-"] for k, (r,) in res.items()}
  scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Meteor(), ["METEOR"]),
             (Rouge(), ["ROUGE_L"]), (Cider(), ["CIDEr"])]
  if spice:
    from pycocoevalcap.spice.spice import Spice
    scorers.append((Spice(), ["SPICE"]))
  out: dict = {}
  items: dict = {}
  for scorer, names in scorers:
    if isinstance(scorer, Bleu):
      score, scores = scorer.compute_score(gts, res, verbose=0)
    else:
      score, scores = scorer.compute_score(gts, res)
    if len(names) == 1:
      score, scores = [score], [scores]
    for name, s, ss in zip(names, score, scores):
      out[name] = float(s)
      if name == "SPICE":
        ss = [x["All"]["f"] for x in ss]
      items[name] = [float(x) for x in ss]
    close = getattr(scorer, "close", None)
    if close:
      close()
  out["num"] = len(ids)
  if per_item:
    out["per_item"] = items
  return out


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def strip_prompt(text: str, prompt: str) -> str:
  """Official caption post-processing: the text after the last occurrence of `prompt`."""
  if prompt:
    at = text.rfind(prompt)
    if at >= 0:
      text = text[at + len(prompt):]
  return text.strip()


# --------------------------------------------------------------------------------------
# Question answering.
# --------------------------------------------------------------------------------------


def exact_match_accuracy(preds, golds) -> float:
  """Official MSRVTT-QA / MSVD-QA accuracy in %: share of predictions string-equal to the
  gold answer (no normalisation on either side). `preds`/`golds` are equal-length sequences
  or mappings with the same keys; a gold may be a list of acceptable answers."""
  preds, golds = _aligned(preds, golds)
  if not preds:
    raise ValueError("no predictions to score")
  hits = [p in g if isinstance(g, (list, tuple)) else p == g for p, g in zip(preds, golds)]
  return 100.0 * float(np.mean(hits))


def _aligned(preds, golds) -> tuple[list, list]:
  if isinstance(preds, Mapping) or isinstance(golds, Mapping):
    if not (isinstance(preds, Mapping) and isinstance(golds, Mapping)):
      raise TypeError("give both predictions and golds as mappings, or both as sequences")
    if set(preds) != set(golds):
      raise ValueError("predictions and golds have different ids")
    keys = list(golds)
    return [preds[k] for k in keys], [golds[k] for k in keys]
  preds, golds = list(preds), list(golds)
  if len(preds) != len(golds):
    raise ValueError(f"{len(preds)} predictions but {len(golds)} golds")
  return preds, golds


# The VQA answer normalisation of the VQA evaluation script (the copy M1 carries,
# `vqaTools/vqaEval.py:68-132`): punctuation handling, number words to digits, articles
# dropped, apostrophe-less contractions restored, lower case.
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9",
                 "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# The contractions the script restores. Their spellings with one apostrophe fewer are the
# keys (a single contraction without its apostrophe, "dont"; a double one with either
# apostrophe missing, "couldnt've" / "couldn'tve"). Contractions whose apostrophe-less form
# is an ordinary word ("shed", "well", "its") are not in the list, nor the "I" forms (the
# script's keys "Im", "Ive", "Id've" are capitalised and never meet lower-cased text).
_CONTRACTION_LIST = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've "
    "hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am "
    "mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't "
    "she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's "
    "someone'd someone'd've someone'll someone's something'd something'd've something'll "
    "that's there'd there'd've there're there's they'd they'd've they'll they're they've "
    "wasn't we'd've we've weren't what'll what're what's what've when's where'd where's "
    "where've who'd who'd've who'll who's who've why'll why're why's won't would've "
    "wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()
_CONTRACTIONS: dict[str, str] = {}
for _c in _CONTRACTION_LIST:
  _at = [i for i, ch in enumerate(_c) if ch == "'"]
  for _i in _at:  # one apostrophe removed (the only one, or either / any of several)
    _CONTRACTIONS[_c[:_i] + _c[_i + 1:]] = _c
# The script's irregular entries: one reversed ("somebody'd" -> "somebodyd") and the
# leading-apostrophe forms.
_CONTRACTIONS.update({"somebody'd": "somebodyd", "twas": "'twas", "ow's'at": "'ow's'at",
                      "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at"})
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
                "<", "@", "`", ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The script's period pattern `(?!<=\d)(\.)(?!\d)` is a lookahead (not a lookbehind): every
# period not followed by a digit goes, "5." included; `re.sub(..., re.UNICODE)` passes 32
# as the count, so at most 32 of them.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_COUNT = 32


def normalize_punctuation(text: str) -> str:
  """Each punctuation mark is deleted when it touches a space (or the text has a comma
  between digits, "1,000"), else replaced by a space; periods not followed by a digit
  are dropped."""
  out = text
  has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
  for p in _PUNCTUATION:
    if (p + " " in text or " " + p in text) or has_digit_comma:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def normalize_digits_articles(text: str) -> str:
  """Lower case, number words -> digits, articles removed, contractions restored."""
  words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
  return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
  """The full VQA answer normalisation."""
  text = " ".join(text.replace("\n", " ").replace("\t", " ").split())
  return normalize_digits_articles(normalize_punctuation(text))


# How the prediction and the human answers are normalised (`vqa_score`).
VQA_NORMALIZATIONS = ("m1", "disagree", "full")


def vqa_score(pred: str, gold_answers: Sequence[str], *, normalization: str = "m1") -> float:
  """VQA accuracy of one prediction in [0, 1] against the human answers (usually 10).

  For each of the leave-one-out subsets of the answers: min(1, #matches / 3); averaged.
  `normalization`:
    m1        the evaluator M1 carries (`vqaTools/vqaEval.py:86-96`): the prediction is
              always normalised (punctuation, digits, articles, contractions); the human
              answers' punctuation only, and only when they disagree
    disagree  prediction and answers normalised only when the answers disagree (all-equal
              answers are compared with the raw prediction): the original VQA API's order
              [unverified here]
    full      the full normalisation on both sides, always
  """
  golds = list(gold_answers)
  if not golds:
    raise ValueError("no gold answers")
  if normalization not in VQA_NORMALIZATIONS:
    raise ValueError(f"eval.vqa_normalization={normalization!r}: one of {VQA_NORMALIZATIONS}")
  pred = pred.replace("\n", " ").replace("\t", " ").strip()
  disagree = len(set(golds)) > 1
  if normalization == "full":
    pred = normalize_vqa_answer(pred)
    golds = [normalize_vqa_answer(g) for g in golds]
  else:
    if normalization == "m1" or disagree:
      pred = normalize_digits_articles(normalize_punctuation(pred))
    if disagree:
      golds = [normalize_punctuation(g) for g in golds]
  matches = [g == pred for g in golds]
  total = sum(matches)
  if len(golds) == 1:
    return float(min(1.0, total / 3.0))
  return float(np.mean([min(1.0, (total - m) / 3.0) for m in matches]))


def vqa_accuracy(preds, golds, *, normalization: str = "m1") -> float:
  """Mean VQA accuracy in % (`golds`: the list of human answers of each question)."""
  preds, golds = _aligned(preds, golds)
  if not preds:
    raise ValueError("no predictions to score")
  return 100.0 * float(np.mean([vqa_score(p, g, normalization=normalization)
                                for p, g in zip(preds, golds)]))


# --------------------------------------------------------------------------------------
# Retrieval.
# --------------------------------------------------------------------------------------


def _ranks(scores: np.ndarray, positives: Sequence[np.ndarray]) -> np.ndarray:
  """0-based rank of the best-ranked positive of each row.

  Rank = position in a descending sort that breaks ties by column index (a stable
  argsort of -score), so equal scores cannot all count as hits.
  """
  ranks = np.empty(scores.shape[0], np.int64)
  cols = np.arange(scores.shape[1])
  for i, pos in enumerate(positives):
    row = scores[i]
    best = []
    for p in np.atleast_1d(pos):
      s = row[p]
      best.append(int(np.sum(row > s) + np.sum((row == s) & (cols < p))))
    ranks[i] = min(best)
  return ranks


def _recall_block(ranks: np.ndarray, prefix: str) -> dict[str, float]:
  out = {f"{prefix}_R{k}": 100.0 * float(np.mean(ranks < k)) for k in (1, 5, 10)}
  out[f"{prefix}_MedR"] = float(np.floor(np.median(ranks + 1)))
  out[f"{prefix}_MeanR"] = float(np.mean(ranks + 1))
  return out


def retrieval_metrics(scores_t2v: np.ndarray, text_to_video: np.ndarray,
                      scores_v2t: np.ndarray | None = None) -> dict[str, float]:
  """Text-to-video and video-to-text recall from similarity scores.

  scores_t2v: (num_texts, num_videos); text_to_video: (num_texts,) the video of each text
  (several texts may share a video). scores_v2t: (num_videos, num_texts), default
  scores_t2v.T (differs after ITM re-ranking, which shortlists per direction).
  t2v: rank of the text's video; v2t: rank of the best-ranked of the video's texts (ALBEF).
  Recalls in %, ranks 1-based (MedR = floor of the median, as video retrieval reports it).
  Videos without any text are left out of v2t.
  """
  scores_t2v = np.asarray(scores_t2v, np.float64)
  text_to_video = np.asarray(text_to_video, np.int64)
  num_texts, num_videos = scores_t2v.shape
  if text_to_video.shape != (num_texts,):
    raise ValueError(f"text_to_video has shape {text_to_video.shape}, expected ({num_texts},)")
  if num_texts and (text_to_video.min() < 0 or text_to_video.max() >= num_videos):
    raise ValueError("text_to_video has video indices out of range")
  scores_v2t = scores_t2v.T if scores_v2t is None else np.asarray(scores_v2t, np.float64)
  if scores_v2t.shape != (num_videos, num_texts):
    raise ValueError(f"scores_v2t has shape {scores_v2t.shape}, expected "
                     f"({num_videos}, {num_texts})")
  t2v = _ranks(scores_t2v, [np.array([v]) for v in text_to_video])
  texts_of = [np.flatnonzero(text_to_video == v) for v in range(num_videos)]
  has_text = [v for v in range(num_videos) if len(texts_of[v])]
  v2t = _ranks(scores_v2t[has_text], [texts_of[v] for v in has_text])
  out = {**_recall_block(t2v, "t2v"), **_recall_block(v2t, "v2t")}
  out["t2v_R_mean"] = float(np.mean([out[f"t2v_R{k}"] for k in (1, 5, 10)]))
  out["v2t_R_mean"] = float(np.mean([out[f"v2t_R{k}"] for k in (1, 5, 10)]))
  out["R_mean"] = (out["t2v_R_mean"] + out["v2t_R_mean"]) / 2
  out["num_texts"], out["num_videos"] = float(num_texts), float(len(has_text))
  return out


# itm_fn(text_indices (N,), video_indices (N,)) -> ITM match scores (N,)
ItmFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
RERANK_FILL = -100.0  # score of the pairs outside the shortlist (ALBEF)


def itm_rerank(sim_t2v: np.ndarray, k: int, itm_fn: ItmFn, *,
               add_itc: bool = True, chunk: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
  """ALBEF / mPLUG re-ranking: per text the top-k videos by ITC similarity, per video the
  top-k texts, are re-scored by `itm_fn` (the ITM head's match logit); others get -100.

  The new score is ITM + ITC similarity (`add_itc`: mPLUG video retrieval,
  M1 `retrieval_vid_mplug.py:97,117`, adds `topk_sim`), else ITM alone (M1 image retrieval,
  `retrieval_img_mplug.py:153-154,173-174`). Returns (scores_t2v (T, V), scores_v2t (V, T)).
  `itm_fn` is called once per chunk of `chunk` pairs (default: all pairs at once); the
  last chunk is padded by repeating its first pair so every call has the same size.
  """
  sim = np.asarray(sim_t2v, np.float64)
  num_texts, num_videos = sim.shape
  kt, kv = min(k, num_videos), min(k, num_texts)
  # Shortlists by descending similarity (stable: ties by index).
  top_v = np.argsort(-sim, axis=1, kind="stable")[:, :kt]          # (T, kt)
  top_t = np.argsort(-sim.T, axis=1, kind="stable")[:, :kv]        # (V, kv)
  t_idx = np.concatenate([np.repeat(np.arange(num_texts), kt), top_t.reshape(-1)])
  v_idx = np.concatenate([top_v.reshape(-1), np.repeat(np.arange(num_videos), kv)])
  scores = _call_chunked(itm_fn, t_idx, v_idx, chunk)
  n1 = num_texts * kt
  t2v = np.full((num_texts, num_videos), RERANK_FILL)
  v2t = np.full((num_videos, num_texts), RERANK_FILL)
  rows_t = np.repeat(np.arange(num_texts), kt)
  rows_v = np.repeat(np.arange(num_videos), kv)
  extra_t = sim[rows_t, top_v.reshape(-1)] if add_itc else 0.0
  extra_v = sim[top_t.reshape(-1), rows_v] if add_itc else 0.0
  t2v[rows_t, top_v.reshape(-1)] = scores[:n1] + extra_t
  v2t[rows_v, top_t.reshape(-1)] = scores[n1:] + extra_v
  return t2v, v2t


def _call_chunked(fn: ItmFn, t_idx: np.ndarray, v_idx: np.ndarray,
                  chunk: int | None) -> np.ndarray:
  n = len(t_idx)
  if not n:
    return np.zeros((0,))
  chunk = chunk or n
  out = []
  for start in range(0, n, chunk):
    t, v = t_idx[start:start + chunk], v_idx[start:start + chunk]
    real = len(t)
    if real < chunk:
      t = np.concatenate([t, np.full(chunk - real, t[0])])
      v = np.concatenate([v, np.full(chunk - real, v[0])])
    out.append(np.asarray(fn(t, v), np.float64).reshape(-1)[:real])
  return np.concatenate(out)


# --------------------------------------------------------------------------------------
# Classification and grounding.
# --------------------------------------------------------------------------------------


def topk_accuracy(logits: np.ndarray, labels: np.ndarray,
                  ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """Top-k accuracy in % ({"top1": ..., "top5": ...}); ties broken by class index."""
  logits, labels = np.asarray(logits), np.asarray(labels)
  if logits.shape[0] != labels.shape[0]:
    raise ValueError(f"{logits.shape[0]} rows of logits but {labels.shape[0]} labels")
  order = np.argsort(-logits, axis=1, kind="stable")
  rank = np.argmax(order == labels[:, None], axis=1)
  return {f"top{k}": 100.0 * float(np.mean(rank < k)) for k in ks}


def box_iou(a: np.ndarray, b: np.ndarray, fmt: str = "cxcywh") -> np.ndarray:
  """Row-wise IoU of boxes (N, 4), as (cx, cy, w, h) (`fmt="cxcywh"`) or corners ("xyxy")."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if fmt == "cxcywh":
    a, b = _corners(a), _corners(b)
  elif fmt != "xyxy":
    raise ValueError(f"unknown box format {fmt!r}")
  w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
  h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
  inter = w * h
  area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)
  union = area(a) + area(b) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _corners(x: np.ndarray) -> np.ndarray:
  return np.stack([x[:, 0] - x[:, 2] / 2, x[:, 1] - x[:, 3] / 2,
                   x[:, 0] + x[:, 2] / 2, x[:, 1] + x[:, 3] / 2], axis=1)


def grounding_accuracy(pred_boxes: np.ndarray, gold_boxes: np.ndarray, *,
                       threshold: float = 0.5, fmt: str = "cxcywh") -> float:
  """Share (%) of predictions with IoU >= `threshold` with the gold box."""
  iou = box_iou(pred_boxes, gold_boxes, fmt)
  if not len(iou):
    raise ValueError("no boxes to score")
  return 100.0 * float(np.mean(iou >= threshold))
