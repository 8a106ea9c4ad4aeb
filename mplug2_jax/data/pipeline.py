"""The Grain input pipeline: records -> per-task examples -> fixed-shape batches.

  source (per split) -> slice by process -> [train: shuffle(seed), repeat] -> mix by weight
  -> preprocess with bad-sample replacement -> batch(batch_size / process_count)
  -> to_iter_dataset -> mp_prefetch (decoding runs in the worker processes)
  -> `DataIterator`: bad-data accounting, checkpointable state, optional global jax.Arrays

Randomness (shuffle order, frame offsets, crops, flips, RandAugment, caption choice) is a
pure function of (seed, position), so a restored iterator continues with exactly the next
example. Batches follow the model family's batch schema (`registry.of(model).batch_schema`;
mPLUG-2: `models/mplug2/schema.py`), all numpy, static shapes; grounding images are
letterboxed into the frame (data/grounding.py).

Host-only metadata (record ids, gold captions/answers) is kept out of the arrays: after each
batch it is in `DataIterator.last_meta`.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np

from mplug2_jax.data import grounding as grounding_lib
from mplug2_jax.data import instruction as instruction_lib
from mplug2_jax.data import media, records
from mplug2_jax.data import text as text_lib
from mplug2_jax.data.bad_data import BadDataCounter
from mplug2_jax.models import registry

REASON_INDEX = {r: i for i, r in enumerate(media.REASONS)}
_META = "_meta"  # per-example host metadata (dict) -> DataIterator.last_meta
_BAD = "_bad"    # per-example list of (record, reason, detail) skipped for this example


def _as_text(value: Any) -> str:
  """Stored texts are bytes; a non-UTF-8 one makes the sample bad."""
  if isinstance(value, str):
    return value
  try:
    return bytes(value).decode("utf-8")
  except UnicodeDecodeError:
    raise media.BadSample("bad_text", "text is not UTF-8") from None


def make_tokenizer(config_data: ml_collections.ConfigDict):
  if not config_data.vocab_file:
    raise ValueError("config.data.vocab_file is empty: give a BERT vocab.txt, the alias "
                     f"{text_lib.BERT_VOCAB_ALIAS!r} (shipped with the package), or a "
                     "SentencePiece .model with data.tokenizer='sentencepiece'")
  if config_data.tokenizer == "sentencepiece":
    from mplug2_jax.data.spm import SentencePieceTokenizer
    return SentencePieceTokenizer(config_data.vocab_file)
  return text_lib.WordPieceTokenizer(text_lib.resolve_vocab(config_data.vocab_file))


# --------------------------------------------------------------------------------------
# Per-example preprocessing.
# --------------------------------------------------------------------------------------


class Preprocessor:
  """record, rng -> example dict for one task. Picklable (sent to Grain workers)."""

  def __init__(self, config_data: ml_collections.ConfigDict, task: str, train: bool,
               num_frames: int, image_size: int, tokenizer, tokens_per_image: int = 1):
    self.c = ml_collections.FrozenConfigDict(config_data)
    self.task, self.train = task, train
    self.num_frames, self.image_size = num_frames, image_size
    self.tok = tokenizer
    self.tokens_per_image = tokens_per_image  # LLM positions per image (instruct)
    if task == "grounding":  # box-token ids, looked up once (numpy: pickles to workers)
      self.box_prefix, self.box_tokens = grounding_lib.token_ids(tokenizer)

  # ---- visual --------------------------------------------------------------------------

  def video(self, record: dict, rng: np.random.Generator) -> np.ndarray:
    """Decoded, transformed, normalised clip."""
    fmt = _as_text(record["media_format"])
    window = (float(record["start_time"]), float(record["end_time"]))
    c = self.c
    clip = media.decode(record["media"], fmt, self.num_frames,
                        "rand" if self.train else "middle", rng,
                        window if window[0] else None)
    if fmt.lower() in media.IMAGE_FORMATS and c.image_transform == "image":
      # Official image transforms on the one image, then the image-as-video repetition.
      if self.train:
        clip = media.image_train_transform(clip, self.image_size, rng, c.randaug,
                                           tuple(c.image_crop_scale), c.hflip, c.clamp_uint8)
      else:
        clip = media.image_eval_transform(clip, self.image_size)
      if c.repeat_images:
        clip = np.repeat(clip, self.num_frames, axis=0)
      return media.normalize(clip)
    if clip.shape[0] == 1 and c.repeat_images:
      clip = np.repeat(clip, self.num_frames, axis=0)
    if self.train and c.video_transform == "pretrain":
      clip = media.pretrain_video_transform(clip, self.image_size, rng, c.randaug)
    elif self.train:
      clip = media.train_transform(clip, self.image_size, rng, c.randaug,
                                   tuple(c.crop_scale), c.hflip, c.bicubic_rounding)
    else:
      clip = media.eval_transform(clip, self.image_size, c.video_eval_resize)
    return media.normalize(clip)

  def grounding(self, record: dict, rng: np.random.Generator) -> dict[str, Any]:
    """Image, expression, box and box-token targets with the official grounding geometry
    (data/grounding.py; spec datasets.md 3.5): letterboxed into image_size x image_size,
    not stretched, so the box stays on the object."""
    c = self.c
    fmt = _as_text(record["media_format"])
    # Grounding records are images; of a video (not an official grounding source) the
    # first decoded frame is used, since one box describes one frame.
    image = media.decode(record["media"], fmt, 1, "middle", None)[0]
    # Official: the expression is only lower-cased (no pre_caption cleaning).
    expression = self._pick_text(record, rng).lower()
    if text_lib.is_blank(expression):
      raise media.BadSample("empty_text", repr(expression)[:60])
    box = np.asarray(record["box"], np.float32)
    if self.train:
      image, box, expression = grounding_lib.train_transform(
          image, box, expression, rng, self.image_size, scales=tuple(c.grounding_scales),
          crop_prob=c.grounding_crop_prob, crop_min=c.grounding_crop_min,
          jitter=c.grounding_jitter, flip_prob=c.grounding_flip, norm=c.grounding_train_norm)
    else:
      image, box = grounding_lib.eval_transform(image, box, self.image_size,
                                                c.grounding_eval_norm)
    clip = image[None]
    if c.repeat_images:
      clip = np.repeat(clip, self.num_frames, axis=0)
    ex = {"video": clip, "boxes": box}
    ex["text_ids"], ex["text_mask"] = grounding_lib.encode_expression(self.tok, expression,
                                                                      c.max_text_len)
    ex.update(grounding_lib.answer_targets(box, self.box_prefix, self.box_tokens))
    ex["answer_weights"] = np.ones((1,), np.float32)
    return ex

  # ---- text ----------------------------------------------------------------------------

  def _pick_text(self, record: dict, rng: np.random.Generator) -> str:
    texts = [_as_text(t) for t in record["texts"]]
    if not texts:
      raise media.BadSample("empty_text", "no text")
    # Several captions: one at random per visit in training (M1 pre-training), else the first.
    return texts[int(rng.integers(len(texts)))] if self.train and len(texts) > 1 else texts[0]

  def _cleaned(self, fn, text: str, words: int) -> str:
    out = fn(text, words)
    if text_lib.is_blank(out):
      raise media.BadSample("empty_text", repr(text)[:60])
    return out

  def __call__(self, record: dict, rng: np.random.Generator) -> dict[str, Any]:
    c, task = self.c, self.task
    ex: dict[str, Any] = {}
    meta = {"id": record["id"], "question_id": int(record["question_id"])}
    if task == "instruct":  # mPLUG-Owl2 (data/instruction.py; models/owl2/schema.py)
      c = self.c
      ex.update(instruction_lib.pipeline_example(
          record, self.tok, max_length=c.max_length, image_size=self.image_size,
          slots=c.images_per_sample, tokens_per_image=self.tokens_per_image,
          truncation=c.truncation, fmt=c.instruct_format, aspect=c.image_aspect))
    elif task == "grounding":
      ex.update(self.grounding(record, rng))
    elif task != "text":
      ex["video"] = self.video(record, rng)
    if task == "caption":
      caption = self._cleaned(text_lib.pre_caption, self._pick_text(record, rng), c.caption_words)
      ex.update(text_lib.encode_caption(
          self.tok, caption, prompt=c.caption_prompt, prompt_join=c.caption_prompt_join,
          max_length=c.max_caption_len, off_by_one=c.caption_off_by_one))
      meta["gold"] = [_as_text(t).lower() for t in record["texts"]]
    elif task == "videoqa":
      words = c.question_words_train if self.train else c.question_words_eval
      question = self._pick_text(record, rng)
      if c.question_preprocess == "pre_question":
        question = self._cleaned(text_lib.pre_question, question, words)
      elif not question.strip():
        raise media.BadSample("empty_text", repr(question)[:60])
      ex["text_ids"], ex["text_mask"] = self.tok.encode_padded(question, c.max_question_len)
      answers = [_as_text(a) for a in record["answers"]]
      weights = [float(w) for w in record["answer_weights"]]
      meta["gold"] = answers
      ex.update(self._answers(answers, weights))
    elif task in ("retrieval", "pretrain", "text"):
      caption = self._cleaned(text_lib.pre_caption, self._pick_text(record, rng), c.text_words)
      ex["text_ids"], ex["text_mask"] = self.tok.encode_padded(caption, c.max_text_len)
      ex["image_ids"] = np.int32(record["group_id"])
      if task == "pretrain" and c.pretrain_lm_targets == "caption":
        # Prefix-LM targets: the caption as the captioning task encodes it (prompt + text
        # + [SEP], the prompt masked), so the decoder learns to stop.
        ex.update(text_lib.encode_caption(
            self.tok, caption, prompt=c.caption_prompt, prompt_join=c.caption_prompt_join,
            max_length=c.max_caption_len, off_by_one=c.caption_off_by_one))
    if task == "classification":
      ex["labels"] = np.int32(record["label"])
    ex["question_id"] = np.int32(record["question_id"])
    ex[_META] = meta
    return ex

  def _answers(self, answers: list[str], weights: list[float]) -> dict[str, np.ndarray]:
    """K answer rows; more answers keep the K heaviest; missing rows get weight 0.

    Padding rows are "[CLS] [SEP]" with all labels ignored, so that no decoder row is
    fully masked (which could give NaN attention) and their loss is exactly 0.
    """
    k, length = self.c.answers_per_question, self.c.max_answer_len
    order = sorted(range(len(answers)), key=lambda i: -weights[i])[:k]
    rows = [text_lib.encode_answer(self.tok, answers[i], length) for i in order]
    w = [weights[i] for i in order]
    while len(rows) < k:
      row = text_lib.encode_answer(self.tok, "", length)
      row["answer_labels"][:] = text_lib.IGNORE_INDEX
      rows.append(row)
      w.append(0.0)
    out = {key: np.stack([r[key] for r in rows]) for key in rows[0]}
    out["answer_weights"] = np.asarray(w, np.float32)
    return out


# --------------------------------------------------------------------------------------
# Bad-sample replacement and eval padding (index-level datasets).
# --------------------------------------------------------------------------------------


class PreprocessedDataset(grain.MapDataset):
  """parent[i] preprocessed with rng(seed, i); a bad record is replaced by a later one.

  The replacement is deterministic (each try with its own rng), so batch shapes hold and a
  resumed run sees the same samples. In training the k-th try is parent[i + k * stride]
  with stride = the batch size: a position of a later batch (it is an ordinary valid
  example there; the record comes again, as itself, in that later batch). A candidate
  whose record is already in this batch (possible across an epoch boundary, where the
  order is reshuffled) is passed over, so a training batch never repeats a record. In
  evaluation (stride 1) the replacement
  keeps the shapes but is marked `valid = 0`, so no metric counts it. Each example carries
  the list of records skipped for it; `DataIterator` counts them.
  """

  def __init__(self, parent: grain.MapDataset, fn: Preprocessor, seed: int,
               max_replacements: int, names: Sequence[str], stride: int = 1):
    super().__init__(parent)
    self._fn, self._seed, self._max = fn, seed, max_replacements
    self._names = tuple(names)
    self._stride = stride

  def __len__(self) -> int:
    return len(self._parent)

  def __str__(self) -> str:
    return "PreprocessedDataset"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    skipped, tried = [], []
    valid = 1
    in_batch = None
    attempt, candidate = 0, 0
    while attempt <= self._max and candidate <= 4 * (self._max + 1):
      item = self._parent[(index + candidate * self._stride) % len(self._parent)]
      candidate += 1
      if item is None:  # eval padding beyond the end of the split
        item, valid = self._parent[0], 0
      source, record = item
      if candidate > 1 and self._stride > 1:
        if in_batch is None:
          in_batch = self._batch_records(index)
        if _record_key(source, record) in in_batch:
          continue  # would repeat a record of this batch
      rng = np.random.default_rng([self._seed, index, attempt])
      try:
        ex = self._fn(record, rng)
      except media.BadSample as e:
        bad = (f"{self._names[source]}:{record['id']}", e.reason, e.detail)
        tried.append(bad)
        # Only the record at this position is counted here; a bad replacement candidate
        # is counted once, at its own position.
        if attempt == 0:
          skipped.append(bad)
        valid = 0 if not self._fn.train else valid
        attempt += 1
        continue
      if "image_ids" in ex:
        ex["image_ids"] = _group_id(source, int(ex["image_ids"]), record["id"])
      ex["valid"] = np.int32(valid)
      ex[_BAD] = skipped
      ex[_META]["source"] = self._names[source]
      return ex
    raise RuntimeError(f"{len(tried)} bad records in a row for position {index}: "
                       + "; ".join(f"{r} ({why}: {d})" for r, why, d in tried))

  def _batch_records(self, index: int) -> set:
    """The records at the positions of `index`'s batch (stride = the batch size)."""
    first = index - index % self._stride
    out = set()
    for j in range(first, first + self._stride):
      item = self._parent[j % len(self._parent)]
      if item is not None:
        out.add(_record_key(*item))
    return out


def _record_key(source: int, record: dict) -> tuple:
  """What makes two records the same: source, id, question id and first text."""
  texts = record.get("texts")
  first = texts[0] if texts is not None and len(texts) else b""
  return (source, str(record.get("id")), int(record.get("question_id", -1)),
          bytes(first) if isinstance(first, (bytes, np.bytes_)) else str(first))


def _group_id(source: int, group: int, record_id: str) -> np.int32:
  """ITC positive-pair id, distinct across mixture sources (24 bits of group per source).

  Records without a group id (-1) use a hash of their id: equal ids are positives.
  """
  if group < 0:
    group = int.from_bytes(hashlib.sha1(record_id.encode()).digest()[:3], "little")
  return np.int32((source % 127) * (1 << 24) + group % (1 << 24))


class PaddedDataset(grain.MapDataset):
  """Pads to `length` with None (eval: every process yields the same number of batches)."""

  def __init__(self, parent: grain.MapDataset, length: int):
    super().__init__(parent)
    self._length = length

  def __len__(self) -> int:
    return self._length

  def __str__(self) -> str:
    return "PaddedDataset"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[index] if index < len(self._parent) else None


# --------------------------------------------------------------------------------------
# Batching.
# --------------------------------------------------------------------------------------


class Collate:
  """Stacks examples; flattens the answer rows and indexes them to their question."""

  def __init__(self, question_offset: int):
    self.question_offset = question_offset  # process_index * local batch (global indices)

  def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k in examples[0] if k not in (_META, _BAD)]
    shapes = {k: {np.shape(e[k]) for e in examples} for k in keys}
    for k, s in shapes.items():
      if len(s) > 1:
        hint = " (mixing images and videos needs data.repeat_images=True)" if k == "video" else ""
        raise ValueError(f"examples of one batch have different {k} shapes {sorted(s)}{hint}")
    batch = {}
    for k in keys:
      if k.startswith("answer_"):
        batch[k] = np.concatenate([e[k] for e in examples])
      else:
        batch[k] = np.stack([e[k] for e in examples])
    if "answer_ids" in batch:
      k = examples[0]["answer_ids"].shape[0]
      batch["answer_question_index"] = (np.repeat(np.arange(len(examples)), k)
                                        + self.question_offset).astype(np.int32)
    batch[_META] = [e[_META] for e in examples]
    batch[_BAD] = [b for e in examples for b in e.get(_BAD, ())]
    return batch


# --------------------------------------------------------------------------------------
# The iterator.
# --------------------------------------------------------------------------------------


class DataIterator:
  """Yields batches; counts bad samples; `get_state`/`set_state` (JSON) resume exactly.

  With `sharding`, batches are global `jax.Array`s assembled from every process's local
  batch by `jax.make_array_from_process_local_data` (batch dimension sharded).
  """

  def __init__(self, dataset: grain.IterDataset, counter: BadDataCounter, sharding=None):
    self._dataset, self._it = dataset, iter(dataset)
    self.counter, self.sharding = counter, sharding
    self.last_meta: list[dict[str, Any]] = []

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return self

  def __next__(self) -> dict[str, Any]:
    batch = next(self._it)
    self.last_meta = batch.pop(_META)
    for rec, reason, detail in batch.pop(_BAD):
      self.counter.add_bad(rec, reason, detail)
    self.counter.add_good(len(self.last_meta))
    self.counter.check()
    if self.sharding is not None:
      batch = to_global(batch, self.sharding)
    return batch

  def metrics(self) -> dict[str, int]:
    """Bad-sample counts per reason, for logging."""
    return self.counter.metrics()

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._it.get_state(), "bad": self.counter.state()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._it.set_state(state["grain"])
    self.counter.set_state(state["bad"])

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close:
      close()


def to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Process-local batch -> global arrays, leading (batch) dimension split over `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# --------------------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------------------


def _stable_seed(seed: int, *parts: Any) -> int:
  digest = hashlib.sha256(repr((seed,) + parts).encode()).digest()
  return int.from_bytes(digest[:4], "little")


def _ensure_flags_parsed() -> None:
  """Grain reads absl flags; in programs that never parse them (tests, notebooks)."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_dataset(config_data: ml_collections.ConfigDict, *, split: str, batch_size: int,
                 model_cfg: ml_collections.ConfigDict, process_index: int = 0,
                 process_count: int = 1, seed: int = 0) -> grain.IterDataset:
  """The Grain dataset of local batches (see the module docstring)."""
  c = config_data
  train = split == c.train_split
  task = c.task or model_cfg.task
  registry.of(model_cfg).batch_schema(model_cfg, c, 1, task)  # an unknown task raises here
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
  local_batch = batch_size // process_count
  if not c.mixture:
    raise ValueError("config.data.mixture is empty: give ((dataset_dir, weight), ...)")
  paths = [p for p, _ in c.mixture]
  weights = [float(w) for _, w in c.mixture]

  parts = []
  for i, path in enumerate(paths):
    source = records.RecordSource(path, split)
    ds = grain.MapDataset.source(source)[process_index::process_count]
    ds = ds.map(lambda r, i=i: (i, r))  # remember the source for error messages
    if train:
      ds = ds.shuffle(seed=_stable_seed(seed, "shuffle", i)).repeat()
    parts.append(ds)
  if len(parts) == 1:
    ds = parts[0]
  elif train:
    ds = grain.MapDataset.mix(parts, weights)
  else:
    ds = grain.MapDataset.concatenate(parts)
  if not train:
    # Same number of batches on every process; padding examples come out with valid = 0.
    per_process = -(-sum(len(records.RecordSource(p, split)) for p in paths) // process_count)
    ds = PaddedDataset(ds, -(-per_process // local_batch) * local_batch)

  num_frames = int(c.get("num_frames") or model_cfg.get("num_frames", 1))
  image_size = int(c.image_size or model_cfg.image_size)
  family = registry.of(model_cfg)
  per_image = family.tokens_per_image(model_cfg) if task == "instruct" else 1
  fn = Preprocessor(c, task, train, num_frames, image_size, make_tokenizer(c), per_image)
  names = [records.find_dataset(p) for p in paths]
  ds = PreprocessedDataset(ds, fn, _stable_seed(seed, "augment", process_index),
                           c.max_replacements, names, stride=local_batch if train else 1)
  ds = ds.batch(local_batch, drop_remainder=train,
                batch_fn=Collate(process_index * local_batch))
  ids = ds.to_iter_dataset()
  if c.num_workers > 0:
    _ensure_flags_parsed()
    ids = ids.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=c.num_workers, per_worker_buffer_size=c.per_worker_buffer_size))
  return ids


def make_iterator(config_data: ml_collections.ConfigDict, *, split: str, batch_size: int,
                  model_cfg: ml_collections.ConfigDict, process_index: int | None = None,
                  process_count: int | None = None, seed: int = 0,
                  sharding=None) -> DataIterator:
  """The one entry point: a checkpointable iterator of batches for `split`.

  `batch_size` is global; each process yields `batch_size / process_count` examples (or,
  with `sharding`, global jax.Arrays). `process_index/count` default to JAX's.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  ds = make_dataset(config_data, split=split, batch_size=batch_size, model_cfg=model_cfg,
                    process_index=process_index, process_count=process_count, seed=seed)
  counter = BadDataCounter(config_data.max_bad_fraction, config_data.bad_min_samples,
                           what=f"{split} samples")
  return DataIterator(ds, counter, sharding)
