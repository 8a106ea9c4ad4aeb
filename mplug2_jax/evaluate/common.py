"""What every evaluator shares: settings, iteration over padded batches, this process's
rows of sharded arrays, gathering across processes, and the `evaluate` driver.

Evaluation iterators pad every process to the same number of batches with `valid = 0` rows
(`data/pipeline.py`); those rows are dropped, and with several processes the remaining
rows are gathered (`multihost_utils.process_allgather`), so every example counts exactly once.
A task's `predict` returns this process's rows only; `evaluate` gathers and scores them.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import time
from typing import Any, Callable, Iterable

import jax
import ml_collections
import numpy as np

from mplug2_jax import config_lib, sharding
from mplug2_jax.models import registry

# Evaluation task -> its module (evaluate/<task>.py): MODEL_TASK, predict, score.
TASKS = ("caption", "videoqa", "retrieval", "classification", "grounding")


def task_module(task: str):
  if task not in TASKS:
    raise config_lib.ConfigError("task", task, f"no evaluator; known: {TASKS}"
                                 f"{config_lib.did_you_mean(task, TASKS)}")
  return importlib.import_module(f"mplug2_jax.evaluate.{task}")


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


def complete_settings(task: str, eval_cfg: ml_collections.ConfigDict,
                      data_cfg: ml_collections.ConfigDict, mesh=None,
                      rules_config: ml_collections.ConfigDict | None = None
                      ) -> ml_collections.ConfigDict:
  """A copy of `eval_cfg` completed from the data config it evaluates: the tokenizer (when
  unset) and, for retrieval, the datasets and text settings `all_texts` reads. With a mesh,
  checks that `eval_cfg.batch_size` splits over its data-parallel devices."""
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
  module = task_module(task)
  context = contextlib.nullcontext()
  if mesh is not None:
    family = registry.of(model_cfg)
    shardings = sharding.param_shardings(family.build(model_cfg), family.init_batch(model_cfg),
                                         mesh, rules_config)
    params = sharding.place(params, shardings)
    context = sharding.activate(mesh, rules_config)
  with context:
    rows, extra = predict(task, model_cfg, params, iterator, eval_cfg, tokenizer=tokenizer,
                          log=log)
    rows = allgather_rows(rows)
    return module.score(model_cfg, params, rows, extra, eval_cfg, log)


def predict(task: str, model_cfg: ml_collections.ConfigDict, params, iterator: Iterable,
            eval_cfg: ml_collections.ConfigDict, *, tokenizer=None,
            log: Callable[[str], None] | None = print) -> tuple[list[dict], Any]:
  """This process's prediction rows (padding removed) and the task's extra outputs."""
  module = task_module(task)
  log = log or (lambda *_: None)
  if getattr(module, "NEEDS_TOKENIZER", False) and tokenizer is None:
    tokenizer = make_tokenizer(eval_cfg)
  return module.predict(model_cfg, params, iterator, eval_cfg, tokenizer, log)


def make_tokenizer(eval_cfg: ml_collections.ConfigDict):
  from mplug2_jax.data import pipeline

  return pipeline.make_tokenizer(ml_collections.ConfigDict(
      dict(vocab_file=eval_cfg.vocab_file, tokenizer=eval_cfg.tokenizer)))


# --------------------------------------------------------------------------------------
# Iteration, padding removal, gathering.
# --------------------------------------------------------------------------------------


def batches(iterator, eval_cfg, log, what: str):
  """Yields (batch, meta, valid mask) with a progress line every `log_every` batches."""
  start, seen, n = time.time(), 0, 0
  limit = int(eval_cfg.max_batches)
  for batch in iterator:
    meta = list(getattr(iterator, "last_meta", None) or [{} for _ in batch["valid"]])
    valid = host_rows(batch["valid"]).astype(bool)
    n += 1
    seen += int(valid.sum())
    yield batch, meta, valid
    every = int(eval_cfg.log_every)
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
