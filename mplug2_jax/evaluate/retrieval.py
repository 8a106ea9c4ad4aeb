"""Retrieval: ITC features of every video and text, similarities, ITM re-ranking of the
top `retrieval_k` per direction (score ITM + ITC for video, ITM alone for images:
`rerank_add_itc`) -> R@1/5/10, MedR, MeanR (both directions)."""

from __future__ import annotations

import time

import numpy as np

from mplug2_jax.evaluate import common, metrics
from mplug2_jax.models import registry

MODEL_TASK = "retrieval"


def predict(model_cfg, params, iterator, cfg, tok, log):
  """ITC features and the states ITM needs, for every valid video and its text."""
  features = registry.of(model_cfg).predict.retrieval_features(model_cfg)

  parts: dict[str, list] = {k: [] for k in ("image_feat", "text_feat", "image_states",
                                            "text_states", "text_mask", "image_ids", "valid")}
  rows = []
  for batch, meta, valid in common.batches(iterator, cfg, log, "retrieval"):
    out = features(params, batch["video"], batch["text_ids"], batch["text_mask"])
    for key, value in zip(("image_feat", "text_feat", "image_states", "text_states"), out):
      parts[key].append(common.host_rows(value))
    parts["text_mask"].append(common.host_rows(batch["text_mask"]))
    parts["image_ids"].append(common.host_rows(batch["image_ids"]))
    parts["valid"].append(valid)
    rows += [{"video_id": meta[i].get("id")} for i in np.flatnonzero(valid)]
  feats = {k: np.concatenate(v) for k, v in parts.items()}
  feats = common.allgather_arrays(feats)  # padded rows included: equal shapes on every process
  keep = feats.pop("valid").astype(bool)
  feats = {k: v[keep] for k, v in feats.items()}
  return rows, feats


def _all_text_features(model_cfg, params, video_names, cfg, log):
  """ITC features and states of every caption of the given videos (record texts)."""
  from mplug2_jax.data import records
  from mplug2_jax.data import text as text_lib

  if not cfg.text_datasets:
    raise ValueError("eval.all_texts needs eval.text_datasets (the split's dataset dirs)")
  texts_of: dict[str, list[str]] = {}
  for path in cfg.text_datasets:
    source = records.RecordSource(path, cfg.split)
    for i in range(len(source)):
      r = source[i]
      texts_of.setdefault(r["id"], [bytes(t).decode("utf-8", "replace")
                                    if not isinstance(t, str) else t for t in r["texts"]])
  texts, text_to_video = [], []
  for v, name in enumerate(video_names):
    own = texts_of.get(name)
    if own is None:
      raise KeyError(f"video {name!r} is not in {list(cfg.text_datasets)}")
    own = [" ".join(own)] if cfg.paragraph else own
    texts += [text_lib.pre_caption(t, int(cfg.text_words)) for t in own]
    text_to_video += [v] * len(own)
  tok = common.make_tokenizer(cfg)
  encoded = [tok.encode_padded(t, int(cfg.max_text_len)) for t in texts]
  ids = np.stack([e[0] for e in encoded])
  mask = np.stack([e[1] for e in encoded])
  features = registry.of(model_cfg).predict.text_features(model_cfg)
  batch = int(cfg.batch_size)
  pad = -len(ids) % batch
  ids_p = np.concatenate([ids, np.repeat(ids[:1], pad, 0)])
  mask_p = np.concatenate([mask, np.repeat(mask[:1], pad, 0)])
  outs = [features(params, ids_p[i:i + batch], mask_p[i:i + batch])
          for i in range(0, len(ids_p), batch)]
  feat = np.concatenate([common.host_rows(o[0]) for o in outs])[:len(ids)]
  states = np.concatenate([common.host_rows(o[1]) for o in outs])[:len(ids)]
  log(f"[retrieval] {len(texts)} texts of {len(video_names)} videos")
  return feat, states, mask, np.asarray(text_to_video)


def score(model_cfg, params, rows, feats, cfg, log):
  """Similarities, ITM re-ranking and recall on the gathered features."""
  if not len(feats["image_ids"]):
    raise ValueError("no valid examples were evaluated")
  # One entry per video record; a video id shared by several records (several texts per
  # video) is one video with several texts.
  groups, video_of = {}, []
  for g in feats["image_ids"].tolist():
    video_of.append(groups.setdefault(g, len(groups)))
  first = {}
  for i, v in enumerate(video_of):
    first.setdefault(v, i)
  video_rows = np.array([first[v] for v in range(len(groups))])
  text_to_video = np.array(video_of)
  image_feat = feats["image_feat"][video_rows]
  if cfg.all_texts:
    names = [rows[r]["video_id"] for r in video_rows]
    feats["text_feat"], feats["text_states"], feats["text_mask"], text_to_video = (
        _all_text_features(model_cfg, params, names, cfg, log))
  sim = feats["text_feat"] @ image_feat.T                          # (T, V)
  out = {"itc": metrics.retrieval_metrics(sim, text_to_video)}
  scores_t2v, scores_v2t = sim, sim.T
  if cfg.itm:
    itm_scores = registry.of(model_cfg).predict.itm_scores(
        model_cfg, feats["image_states"][video_rows], feats["text_states"], feats["text_mask"])
    start = time.time()
    scores_t2v, scores_v2t = metrics.itm_rerank(
        sim, int(cfg.retrieval_k), lambda t, v: common.host_rows(itm_scores(params, t, v)),
        add_itc=bool(cfg.rerank_add_itc), chunk=int(cfg.itm_chunk))
    log(f"[retrieval] ITM re-ranking of the top {cfg.retrieval_k} in {time.time() - start:.1f}s")
    out["itm"] = metrics.retrieval_metrics(scores_t2v, text_to_video, scores_v2t)
  final = dict(out["itm" if cfg.itm else "itc"])
  final.update({f"itc_{k}": v for k, v in out["itc"].items() if "R" in k})
  names = [rows[r]["video_id"] for r in video_rows]
  order = np.argsort(-scores_t2v, axis=1, kind="stable")[:, :10]
  out_rows = [{"text_index": t, "video_id": names[int(text_to_video[t])],
               "top10_videos": [names[v] for v in order[t]]}
              for t in range(len(text_to_video))]
  return out_rows, final
