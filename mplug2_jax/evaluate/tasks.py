"""Task evaluators: (model config, params, eval iterator, eval config) -> predictions, metrics.

  caption         cached beam search (beam 5, 4-20 tokens), decode, strip [SEP]/[CLS]/[PAD],
                  keep the text after the last prompt -> COCO caption metrics (spec 6.1)
  videoqa         open generation (beam 5, 1-10 tokens) -> exact match (MSRVTT-QA/MSVD-QA)
                  or VQA accuracy; or answer-list ranking (`qa_mode="rank"`, spec 6.2)
  retrieval       ITC features of every video and text, similarities, ITM re-ranking of the
                  top `k_test` per direction -> R@1/5/10, MedR, MeanR (both directions)
  classification  linear head on the video [CLS] -> top-1 / top-5
  grounding       4 greedy box-coordinate tokens after the [unused339] prefix (mPLUG v1)
                  -> accuracy at IoU >= 0.5

Each sample's encoder outputs are computed once (the beam search shares them over its beams).
Evaluation iterators pad every process to the same number of batches with `valid = 0` rows
(`data/pipeline.py`); those rows are dropped here, and with several processes the remaining
rows are gathered (`multihost_utils.process_allgather`), so every example counts exactly once.
`predict` returns this process's rows only; `evaluate` gathers and scores them.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mplug2_jax.data import grounding as grounding_lib
from mplug2_jax.evaluate import generation, metrics
from mplug2_jax.models import mplug2

TASKS = ("caption", "videoqa", "retrieval", "classification", "grounding")


def default_eval_config() -> ml_collections.ConfigDict:
  """`config.eval`: every key the evaluators read, with the official defaults."""
  e = ml_collections.ConfigDict()
  e.split = "test"              # data split evaluated
  e.batch_size = 8              # global batch size
  e.max_batches = 0             # 0 = the whole split (else a smoke-test limit)
  e.log_every = 10              # progress line every this many batches
  # Tokenizer (filled from config.data by the CLI when empty).
  e.vocab_file = ""
  e.tokenizer = "wordpiece"
  # Generation (captioning official: beam 5, 4-20; QA: beam 5, 1-10; spec sections 6, 9).
  e.beam_size = 5
  e.min_length = 4
  e.max_length = 20
  e.prompt = "a video of"       # caption: text after its last occurrence is kept
  # QA.
  e.qa_mode = "generate"        # generate | rank (answer-list ranking, official rerank=True)
  e.qa_metric = "exact"         # exact (MSRVTT-QA / MSVD-QA) | vqa (VQAv2 accuracy)
  e.answer_list = None          # rank mode: path of a JSON {answer: index} (key order) or
                                # [answer], or a list of answers
  e.k_test = 128                # rank mode: first-token shortlist size
  e.gold_file = ""              # vqa metric: JSON list of {question_id, answer: [10 answers]}
  e.submission = False          # also write [{question_id, answer}] (VQAv2 test-dev / EvalAI)
  # Retrieval.
  e.retrieval_k = 128           # ITM re-ranking shortlist per text / per video (k_test)
  e.itm = True                  # False: ITC similarities only (no re-ranking)
  e.itm_chunk = 64              # pairs per ITM call (static shape)
  e.all_texts = False           # every caption of each video (COCO / Flickr: 5 per image)
                                # read from `text_datasets`; False: the pipeline's first one
  e.paragraph = False           # all_texts joined into one paragraph (DiDeMo)
  e.text_datasets = ()          # dataset dirs of the split (the CLI fills config.data.mixture)
  e.text_words = 30             # pre_caption word limit / tokens of those texts
  e.max_text_len = 30
  # Grounding: the box-token scheme is fixed by the training data (data/grounding.py, the
  # one definition used by the pipeline's targets and by `_predict_grounding`).
  return e


# Official per-task generation settings (spec sections 6.1, 6.2).
GENERATION_DEFAULTS = {"caption": dict(beam_size=5, min_length=4, max_length=20),
                       "videoqa": dict(beam_size=5, min_length=1, max_length=10)}


def eval_config(task: str, **overrides) -> ml_collections.ConfigDict:
  """`default_eval_config` with the task's official generation settings and overrides."""
  e = default_eval_config()
  for k, v in GENERATION_DEFAULTS.get(task, {}).items():
    e[k] = v
  for k, v in overrides.items():
    e[k] = v
  return e


# --------------------------------------------------------------------------------------
# Entry points.
# --------------------------------------------------------------------------------------


def complete_settings(task: str, eval_cfg: ml_collections.ConfigDict,
                      data_cfg: ml_collections.ConfigDict, mesh=None,
                      rules_config: ml_collections.ConfigDict | None = None
                      ) -> ml_collections.ConfigDict:
  """A copy of `eval_cfg` completed from the data config it evaluates: the tokenizer (when
  unset) and, for retrieval, the datasets and text settings `all_texts` reads. With a mesh,
  checks that `eval_cfg.batch_size` splits over its data-parallel devices."""
  from mplug2_jax import config_lib, sharding

  out = ml_collections.ConfigDict(eval_cfg.to_dict())
  if not out.vocab_file:
    out.vocab_file, out.tokenizer = data_cfg.vocab_file, data_cfg.tokenizer
  if task == "retrieval":  # all_texts reads every caption of the split's records
    out.text_datasets = tuple(p for p, _ in data_cfg.mixture)
    out.text_words, out.max_text_len = data_cfg.text_words, data_cfg.max_text_len
  if mesh is not None:
    ways = sharding.batch_ways(mesh, rules_config)
    if int(out.batch_size) % ways:
      raise config_lib.ConfigError("eval.batch_size", out.batch_size,
                                   f"not divisible by the {ways} data-parallel devices of "
                                   f"mesh {dict(mesh.shape)}")
  return out


def evaluate(task: str, model_cfg: ml_collections.ConfigDict, params, iterator: Iterable,
             eval_cfg: ml_collections.ConfigDict, *, tokenizer=None,
             log: Callable[[str], None] | None = print, mesh=None,
             rules_config: ml_collections.ConfigDict | None = None) -> tuple[list[dict], dict]:
  """Predictions (every process's rows, each example once) and metrics of `task`.

  With `mesh` (and `rules_config`, a config holding `sharding_rules`), the parameters are
  sharded over it by the logical rules and the model runs under them; the iterator should
  then yield global batches sharded along the data axes (`make_iterator(...,
  sharding=batch_sharding(mesh, config))`), so each device decodes its slice of the batch.
  """
  log = log or (lambda *_: None)
  context = contextlib.nullcontext()
  if mesh is not None:
    from mplug2_jax import sharding

    params = place_params(params, model_cfg, mesh, rules_config)
    context = sharding.activate(mesh, rules_config)
  with context:
    rows, extra = predict(task, model_cfg, params, iterator, eval_cfg, tokenizer=tokenizer,
                          log=log)
    rows = allgather_rows(rows)
    if task == "retrieval":
      return _retrieval_finish(model_cfg, params, rows, extra, eval_cfg, log)
  return rows, score(task, rows, eval_cfg)


def predict(task: str, model_cfg: ml_collections.ConfigDict, params, iterator: Iterable,
            eval_cfg: ml_collections.ConfigDict, *, tokenizer=None,
            log: Callable[[str], None] | None = print) -> tuple[list[dict], Any]:
  """This process's prediction rows (padding removed); retrieval also returns features."""
  if task not in TASKS:
    raise ValueError(f"unknown evaluation task {task!r}; known: {TASKS}")
  log = log or (lambda *_: None)
  if task in ("caption", "videoqa", "grounding") and tokenizer is None:
    tokenizer = make_tokenizer(eval_cfg)
  fn = {"caption": _predict_caption, "videoqa": _predict_videoqa,
        "retrieval": _predict_retrieval, "classification": _predict_classification,
        "grounding": _predict_grounding}[task]
  return fn(model_cfg, params, iterator, eval_cfg, tokenizer, log)


def score(task: str, rows: list[dict], eval_cfg: ml_collections.ConfigDict) -> dict:
  """Metrics of gathered prediction rows (caption / videoqa / classification / grounding)."""
  if not rows:
    raise ValueError("no valid examples were evaluated")
  if task == "caption":
    keys = [str(i) for i in range(len(rows))]
    out = metrics.caption_metrics({k: r["pred_caption"] for k, r in zip(keys, rows)},
                                  {k: r["gold_caption"] for k, r in zip(keys, rows)})
    return out
  if task == "videoqa":
    preds = [r["pred_answer"] for r in rows]
    if eval_cfg.qa_metric == "vqa":
      golds = _vqa_golds(rows, eval_cfg)
      return {"vqa_accuracy": metrics.vqa_accuracy(preds, golds), "num": len(rows)}
    golds = [r["gold_answer"][0] if r["gold_answer"] else "" for r in rows]
    return {"accuracy": metrics.exact_match_accuracy(preds, golds), "num": len(rows)}
  if task == "classification":
    logits = np.stack([r.pop("_logits") for r in rows])
    labels = np.array([r["label"] for r in rows])
    out = metrics.topk_accuracy(logits, labels, ks=(1, min(5, logits.shape[1])))
    out["num"] = len(rows)
    return out
  if task == "grounding":
    pred = np.array([r["pred_box"] for r in rows])
    gold = np.array([r["gold_box"] for r in rows])
    return {"accuracy_iou50": metrics.grounding_accuracy(pred, gold), "num": len(rows)}
  raise ValueError(task)


def make_tokenizer(eval_cfg: ml_collections.ConfigDict):
  from mplug2_jax.data import pipeline

  return pipeline.make_tokenizer(ml_collections.ConfigDict(
      dict(vocab_file=eval_cfg.vocab_file, tokenizer=eval_cfg.tokenizer)))


# --------------------------------------------------------------------------------------
# Iteration, padding removal, gathering.
# --------------------------------------------------------------------------------------


def _batches(iterator, eval_cfg, log, what: str):
  """Yields (batch, meta, valid mask) with a progress line every `log_every` batches."""
  start, seen, n = time.time(), 0, 0
  limit = int(eval_cfg.get("max_batches", 0) or 0)
  for batch in iterator:
    meta = list(getattr(iterator, "last_meta", None) or [{} for _ in batch["valid"]])
    valid = host_rows(batch["valid"]).astype(bool)
    n += 1
    seen += int(valid.sum())
    yield batch, meta, valid
    every = int(eval_cfg.get("log_every", 10) or 0)
    if every and n % every == 0:
      rate = seen / max(time.time() - start, 1e-9)
      log(f"[{what}] {n} batches, {seen} examples, {rate:.1f} examples/s")
    if limit and n >= limit:
      break
  log(f"[{what}] done: {n} batches, {seen} examples on process {jax.process_index()} "
      f"in {time.time() - start:.1f}s")


def host_rows(x) -> np.ndarray:
  """This process's rows of an array sharded along its first (batch) axis, in the order of
  the process's local examples; a host array or a fully addressable jax.Array as it is.
  (Multi-host: global batches are built from each process's local batch, so the local
  rows are this process's addressable shards, by their offset; replicas appear once.)"""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  shards = {}
  for shard in x.addressable_shards:
    start = shard.index[0].start if shard.index else None
    shards.setdefault(start or 0, shard.data)
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)], axis=0)


def place_params(params, model_cfg: ml_collections.ConfigDict, mesh, config) -> Any:
  """Parameters -> global arrays sharded over `mesh` by the logical rules of `config`
  (each process builds only its own shards). Leaves the model does not declare are
  replicated; leaves that are already sharded jax.Arrays (the train loop's) stay as they
  are."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  from mplug2_jax import sharding
  from mplug2_jax.train import optimizer as optimizer_lib

  with sharding.activate(mesh, config):
    boxed = sharding.abstract_params(mplug2.build(model_cfg), mplug2.dummy_batch(model_cfg, 1))
    tree = sharding.logical_shardings(boxed, mesh, config)
  by_path = {optimizer_lib.path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, NamedSharding))[0]}
  replicated = NamedSharding(mesh, P())

  def one(path, x):
    if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and (
        x.sharding.mesh == mesh):
      return x
    value = np.asarray(x)
    target = by_path.get(optimizer_lib.path_str(path), replicated)
    return jax.make_array_from_callback(value.shape, target, lambda index: value[index])

  return jax.tree_util.tree_map_with_path(one, params)


def allgather_rows(rows: list[dict]) -> list[dict]:
  """Every process's rows, process-major (JSON-encoded bytes through process_allgather)."""
  if jax.process_count() == 1:
    return rows
  from jax.experimental import multihost_utils

  arrays = [r.pop("_logits", None) for r in rows]
  for r, a in zip(rows, arrays):
    if a is not None:
      r["_logits"] = np.asarray(a).tolist()
  data = np.frombuffer(json.dumps(rows).encode("utf-8"), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64)))
  sizes = sizes.reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:data.size] = data
  everything = np.asarray(multihost_utils.process_allgather(buf))
  out = []
  for p, size in enumerate(sizes):
    out.extend(json.loads(everything[p, :int(size)].tobytes().decode("utf-8")))
  for r in out:
    if "_logits" in r:
      r["_logits"] = np.asarray(r["_logits"], np.float32)
  return out


def allgather_arrays(tree: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Concatenates each process's arrays along axis 0 (equal shapes on every process)."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils

  return {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
          for k, v in tree.items()}


def _apply(model, method):
  return lambda params, *args: model.apply({"params": params}, *args, method=method)


# --------------------------------------------------------------------------------------
# Captioning.
# --------------------------------------------------------------------------------------


def _predict_caption(model_cfg, params, iterator, cfg, tok, log):
  model = mplug2.build(model_cfg)
  cached = mplug2.build(model_cfg, use_cache=True)
  embed = _apply(model, mplug2.Mplug2.embed_image)

  @jax.jit
  def generate(params, video):
    image, _ = embed(params, video)  # once per sample; the K beams share it
    mask = jnp.ones(image.shape[:2], jnp.int32)
    return generation.beam_search_cached(cached, params, image, mask, beam_size=cfg.beam_size,
                                         min_length=cfg.min_length, max_length=cfg.max_length)

  rows = []
  for batch, meta, valid in _batches(iterator, cfg, log, "caption"):
    ids = host_rows(generate(params, batch["video"]).ids)
    for i in np.flatnonzero(valid):
      text = tok.decode_prediction(ids[i].tolist())
      rows.append({"video_id": meta[i].get("id"),
                   "pred_caption": metrics.strip_prompt(text, cfg.prompt),
                   "gold_caption": list(meta[i].get("gold", []))})
  return rows, None


# --------------------------------------------------------------------------------------
# Question answering.
# --------------------------------------------------------------------------------------


def _qa_encoder(model):
  embed_image = _apply(model, mplug2.Mplug2.embed_image)
  embed_text = _apply(model, mplug2.Mplug2.embed_text)
  fuse = _apply(model, mplug2.Mplug2.fuse)

  def encode(params, video, text_ids, text_mask):
    image, _ = embed_image(params, video)
    image_mask = jnp.ones(image.shape[:2], jnp.int32)
    question, _ = embed_text(params, text_ids, text_mask)
    fused_image, fused_text = fuse(params, image, image_mask, question, text_mask)
    return mplug2.answer_encoder_states(fused_image, image_mask, fused_text, text_mask, None)

  return encode


def load_answer_list(path_or_list) -> list[str]:
  """Answer list: JSON {answer: index} (keys in file order, official) or [answer]."""
  if isinstance(path_or_list, (list, tuple)):
    return [str(a) for a in path_or_list]
  with open(path_or_list, encoding="utf-8") as f:
    data = json.load(f)
  return [str(a) for a in (data.keys() if isinstance(data, dict) else data)]


def encode_answer_list(tok, answers: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """`[CLS] answer [SEP]` ids and mask, padded to the longest (never truncated)."""
  from mplug2_jax.data import text as text_lib

  length = max(len(tok.encode(a + "[SEP]")) for a in answers)
  rows = [text_lib.encode_answer(tok, a, length) for a in answers]
  return (np.stack([r["answer_ids"] for r in rows]), np.stack([r["answer_mask"] for r in rows]))


def _predict_videoqa(model_cfg, params, iterator, cfg, tok, log):
  model = mplug2.build(model_cfg)
  cached = mplug2.build(model_cfg, use_cache=True)
  encode = _qa_encoder(model)
  decode = _apply(model, mplug2.Mplug2.decode)
  rank = cfg.qa_mode == "rank"
  if cfg.qa_mode not in ("generate", "rank"):
    raise ValueError(f"eval.qa_mode={cfg.qa_mode!r}: generate | rank")
  if rank:
    if not cfg.answer_list:
      raise ValueError("eval.qa_mode='rank' needs eval.answer_list")
    answers = load_answer_list(cfg.answer_list)
    answer_ids, answer_mask = (jnp.asarray(a) for a in encode_answer_list(tok, answers))
    k = min(int(cfg.k_test), len(answers))

    @jax.jit
    def run(params, video, text_ids, text_mask):
      states, mask = encode(params, video, text_ids, text_mask)
      decode_fn = lambda i, m, s, sm: decode(params, i, m, s, sm)[0]
      top, _ = generation.rank_answers(decode_fn, states, mask, answer_ids, answer_mask, k)
      return top[:, 0]
  else:
    @jax.jit
    def run(params, video, text_ids, text_mask):
      states, mask = encode(params, video, text_ids, text_mask)  # once per question
      return generation.beam_search_cached(
          cached, params, states, mask, beam_size=cfg.beam_size, min_length=cfg.min_length,
          max_length=cfg.max_length).ids

  rows = []
  for batch, meta, valid in _batches(iterator, cfg, log, "videoqa"):
    out = host_rows(run(params, batch["video"], batch["text_ids"], batch["text_mask"]))
    qids = host_rows(batch["question_id"])
    for i in np.flatnonzero(valid):
      pred = answers[int(out[i])] if rank else tok.decode_prediction(out[i].tolist())
      rows.append({"question_id": int(qids[i]), "video_id": meta[i].get("id"),
                   "pred_answer": pred, "gold_answer": list(meta[i].get("gold", []))})
  return rows, None


def _vqa_golds(rows, cfg) -> list[list[str]]:
  """Human answers per question: from `eval.gold_file` (the 10 answers), else the record's
  answers (the built VQA records keep distinct answers only, so that is approximate)."""
  if not cfg.gold_file:
    return [r["gold_answer"] for r in rows]
  with open(cfg.gold_file, encoding="utf-8") as f:
    table = {int(a["question_id"]): a["answer"] for a in json.load(f) if "answer" in a}
  golds = []
  for r in rows:
    if r["question_id"] not in table:
      raise KeyError(f"question_id {r['question_id']} is not in {cfg.gold_file}")
    g = table[r["question_id"]]
    golds.append([g] if isinstance(g, str) else list(g))
  return golds


# --------------------------------------------------------------------------------------
# Retrieval.
# --------------------------------------------------------------------------------------


def _predict_retrieval(model_cfg, params, iterator, cfg, tok, log):
  """ITC features and the states ITM needs, for every valid video and its text."""
  model = mplug2.build(model_cfg)
  embed_image = _apply(model, mplug2.Mplug2.embed_image)
  embed_text = _apply(model, mplug2.Mplug2.embed_text)
  itc = _apply(model, mplug2.Mplug2.itc_features)

  @jax.jit
  def features(params, video, text_ids, text_mask):
    image, _ = embed_image(params, video)
    text, _ = embed_text(params, text_ids, text_mask)
    image_feat, text_feat, _ = itc(params, image, text)
    return image_feat, text_feat, image, text

  parts: dict[str, list] = {k: [] for k in ("image_feat", "text_feat", "image_states",
                                            "text_states", "text_mask", "image_ids", "valid")}
  rows = []
  for batch, meta, valid in _batches(iterator, cfg, log, "retrieval"):
    out = features(params, batch["video"], batch["text_ids"], batch["text_mask"])
    for key, value in zip(("image_feat", "text_feat", "image_states", "text_states"), out):
      parts[key].append(host_rows(value))
    parts["text_mask"].append(host_rows(batch["text_mask"]))
    parts["image_ids"].append(host_rows(batch["image_ids"]))
    parts["valid"].append(valid)
    rows += [{"video_id": meta[i].get("id")} for i in np.flatnonzero(valid)]
  feats = {k: np.concatenate(v) for k, v in parts.items()}
  feats = allgather_arrays(feats)  # padded rows included: equal shapes on every process
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
  tok = make_tokenizer(cfg)
  encoded = [tok.encode_padded(t, int(cfg.max_text_len)) for t in texts]
  ids = np.stack([e[0] for e in encoded])
  mask = np.stack([e[1] for e in encoded])
  model = mplug2.build(model_cfg)
  embed_text = _apply(model, mplug2.Mplug2.embed_text)
  itc = _apply(model, mplug2.Mplug2.itc_features)

  @jax.jit
  def features(params, ids, mask):
    text, _ = embed_text(params, ids, mask)
    _, text_feat, _ = itc(params, text, text)  # the text projection of the text [CLS]
    return text_feat, text

  batch = int(cfg.batch_size)
  pad = -len(ids) % batch
  ids_p = np.concatenate([ids, np.repeat(ids[:1], pad, 0)])
  mask_p = np.concatenate([mask, np.repeat(mask[:1], pad, 0)])
  outs = [features(params, ids_p[i:i + batch], mask_p[i:i + batch])
          for i in range(0, len(ids_p), batch)]
  feat = np.concatenate([host_rows(o[0]) for o in outs])[:len(ids)]
  states = np.concatenate([host_rows(o[1]) for o in outs])[:len(ids)]
  log(f"[retrieval] {len(texts)} texts of {len(video_names)} videos")
  return feat, states, mask, np.asarray(text_to_video)


def _retrieval_finish(model_cfg, params, rows, feats, cfg, log):
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
    model = mplug2.build(model_cfg)
    fuse = _apply(model, mplug2.Mplug2.fuse)
    itm = _apply(model, mplug2.Mplug2.itm_logits)
    image_states = jnp.asarray(feats["image_states"][video_rows])
    text_states, text_mask = jnp.asarray(feats["text_states"]), jnp.asarray(feats["text_mask"])

    @jax.jit
    def itm_scores(params, t, v):
      image = image_states[v]
      _, fused_text = fuse(params, image, jnp.ones(image.shape[:2], jnp.int32),
                           text_states[t], text_mask[t])
      return itm(params, fused_text)[:, 1]

    start = time.time()
    scores_t2v, scores_v2t = metrics.itm_rerank(
        sim, int(cfg.retrieval_k), lambda t, v: host_rows(itm_scores(params, t, v)),
        chunk=int(cfg.itm_chunk))
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


# --------------------------------------------------------------------------------------
# Classification and grounding.
# --------------------------------------------------------------------------------------


def _predict_classification(model_cfg, params, iterator, cfg, tok, log):
  model = mplug2.build(model_cfg)
  classify = jax.jit(_apply(model, mplug2.Mplug2.classify))
  rows = []
  for batch, meta, valid in _batches(iterator, cfg, log, "classification"):
    logits = host_rows(classify(params, batch["video"]))
    labels = host_rows(batch["labels"])
    for i in np.flatnonzero(valid):
      top = np.argsort(-logits[i], kind="stable")[:5]
      rows.append({"video_id": meta[i].get("id"), "label": int(labels[i]),
                   "top5": top.tolist(), "_logits": logits[i]})
  return rows, None


def _predict_grounding(model_cfg, params, iterator, cfg, tok, log):
  model = mplug2.build(model_cfg)
  encode = _qa_encoder(model)
  decode = _apply(model, mplug2.Mplug2.decode)
  # [unused339] prefix, then 4 greedy steps over the 337 coordinate tokens (spec 3.5).
  prefix, coord_ids = grounding_lib.token_ids(tok)
  coords = jnp.asarray(coord_ids)
  steps = grounding_lib.ANSWER_LEN - 1

  @jax.jit
  def run(params, video, text_ids, text_mask):
    states, mask = encode(params, video, text_ids, text_mask)
    b = states.shape[0]
    seq = jnp.zeros((b, steps + 1), jnp.int32).at[:, 0].set(prefix)
    ones = jnp.ones_like(seq)  # causal: the unfilled positions are never attended to
    qs = []
    for step in range(steps):  # greedy, restricted to the coordinate tokens
      logits = decode(params, seq, ones, states, mask)[0][:, step]
      q = jnp.argmax(logits[:, coords], axis=-1)
      seq = seq.at[:, step + 1].set(coords[q])
      qs.append(q)
    return grounding_lib.dequantize(jnp.stack(qs, axis=1).astype(jnp.float32))  # cx,cy,w,h

  rows = []
  for batch, meta, valid in _batches(iterator, cfg, log, "grounding"):
    boxes = host_rows(run(params, batch["video"], batch["text_ids"], batch["text_mask"]))
    gold = host_rows(batch["boxes"])
    for i in np.flatnonzero(valid):
      rows.append({"id": meta[i].get("id"), "pred_box": boxes[i].tolist(),
                   "gold_box": gold[i].tolist()})
  return rows, None


# --------------------------------------------------------------------------------------
# Experiment configs (configs/eval/*.py build on this).
# --------------------------------------------------------------------------------------

# Which model task builds the modules each evaluator needs.
MODEL_TASK = {"caption": "caption", "videoqa": "videoqa", "retrieval": "retrieval",
              "classification": "classification", "grounding": "grounding"}


def experiment_config(task: str, arg: str | None = None, *, paper: dict | None = None,
                      data: dict | None = None, settings: dict | None = None,
                      model: dict | None = None, **defaults) -> ml_collections.ConfigDict:
  """The config of one paper result row.

  `arg` (the text after ":" in `--config FILE:arg`) may set size=, data= (built dataset
  directory), vocab= (BERT vocab.txt), split=, batch= (global batch size). `paper` maps
  metric keys to the paper's numbers (printed beside ours). The checkpoint's own
  model_config.json replaces `config.model` when present.
  """
  from mplug2_jax import config_lib

  a = config_lib.parse_arg(arg, size="large", data="", vocab="", split="test", batch=8,
                           **defaults)
  config = config_lib.base_config(a.size, MODEL_TASK[task])
  config.task = task
  config.paper = ml_collections.ConfigDict(paper or {})
  for k, v in (model or {}).items():
    config.model[k] = v
  config.data.task = task
  config.data.mixture = ((a.data, 1.0),) if a.data else ()
  config.data.vocab_file = a.vocab
  config.data.eval_split = a.split
  for k, v in (data or {}).items():
    config.data[k] = v
  config.eval = eval_config(MODEL_TASK[task] if task != "grounding" else "grounding",
                            split=a.split, batch_size=a.batch, **(settings or {}))
  return config
