"""On-disk format: a tfds DatasetBuilder writing ArrayRecord, and a Grain source reading it.

Every dataset kind shares one record schema (`FEATURES`), so one pipeline reads them all:

  id             str    video id / image path / question id as in the annotation file
  media          bytes  the encoded file (mp4/avi/webm/gif/jpeg/png...); b"" for text-only
  media_format   str    file extension without the dot ("mp4", "jpeg", "" for text-only)
  texts          [str]  captions (train: one; eval: all golden captions) or the question
                        (instruction: one JSON string, the list of {from, value} turns)
  answers        [str]  QA answers (raw, not normalised)
  answer_weights [f32]  one per answer
  group_id       int64  positive-pair id (same video/image -> same id) for ITC
  label          int64  class label (Kinetics), else -1
  box            f32[4] grounding box (x1, y1, x2, y2) in pixels, else zeros
  start_time, end_time  f32  seconds; sampling window of video pre-training records (0: none)
  question_id    int64  0-based line position in the test file (official QA), else -1

Texts are stored as raw bytes (tfds `Text` keeps bytes as given), so a non-UTF-8 caption
reaches the pipeline and is counted there rather than crashing a writer.

Writing goes through `tensorflow_datasets` (`GeneratorBasedBuilder`, `file_format=
"array_record"`), which needs no TensorFlow. tfds writes into an `incomplete.*` directory
and renames it only after every split finished, so a failed build never looks complete.
Layout: `<out>/mplug2_records/<kind>/1.0.0/{dataset_info.json, *.array_record-*}`.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from etils import epath

VERSION = "1.0.0"
KINDS = {
    "video_text": "WebVid-style video-text pairs (pre-training)",
    "video_caption": "MSRVTT / MSVD captioning JSONL",
    "video_qa": "MSRVTT-QA / MSVD-QA / TGIF-FrameQA JSONL",
    "video_retrieval": "clip_name/video + caption JSONL (MSRVTT, DiDeMo, LSMDC)",
    "image_text": "COCO / Flickr / CC3M-style image-text JSON list",
    "vqa": "VQAv2 + VG QA JSON list (mPLUG layout)",
    "kinetics": "Kinetics CSV + class-folder videos",
    "grounding": "RefCOCO-family split files (TransVG .pth)",
    "text": "plain text corpus, one document per line",
    "instruction": "mPLUG-Owl2 / LLaVA-style instruction JSON list",
}

EMPTY_RECORD = dict(id="", media=b"", media_format="", texts=[], answers=[], answer_weights=[],
                    group_id=-1, label=-1, box=np.zeros(4, np.float32), start_time=0.0,
                    end_time=0.0, question_id=-1)


def _features():
  import tensorflow_datasets as tfds

  f = tfds.features
  scalar = lambda dtype: f.Tensor(shape=(), dtype=dtype)
  return f.FeaturesDict({
      "id": f.Text(),
      "media": scalar(np.object_),
      "media_format": f.Text(),
      "texts": f.Sequence(f.Text()),
      "answers": f.Sequence(f.Text()),
      "answer_weights": f.Sequence(scalar(np.float32)),
      "group_id": scalar(np.int64),
      "label": scalar(np.int64),
      "box": f.Tensor(shape=(4,), dtype=np.float32),
      "start_time": scalar(np.float32),
      "end_time": scalar(np.float32),
      "question_id": scalar(np.int64),
  })


def _builder_class():
  """The builder class (created lazily so that importing this module stays cheap)."""
  import tensorflow_datasets as tfds
  from etils import epath

  class Mplug2Records(tfds.core.GeneratorBasedBuilder):
    """mPLUG-2 records of one kind; the splits' records are handed in by `write`."""

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=k, description=d) for k, d in KINDS.items()]

    # tfds derives the code path through `importlib_resources`, which is not installed with
    # it on Python 3.11; the path only locates optional checksum files, so give it directly.
    code_path = tfds.core.utils.classproperty(classmethod(lambda cls: epath.Path(__file__)))

    split_records: Mapping[str, Callable[[], Iterable[dict[str, Any]]]] = {}
    metadata: dict[str, Any] = {}

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=_features(),
                                   metadata=tfds.core.MetadataDict(self.metadata))

    def _split_generators(self, dl_manager):
      del dl_manager  # the raw data is local
      return {name: self._generate_examples(make) for name, make in self.split_records.items()}

    def _generate_examples(self, make):
      for i, record in enumerate(make()):
        yield i, {**EMPTY_RECORD, **record}

  return Mplug2Records


_BUILDER = None


def write(out_dir: str, kind: str,
          split_records: Mapping[str, Callable[[], Iterable[dict[str, Any]]]],
          metadata: dict[str, Any] | None = None) -> str:
  """Writes the splits (name -> zero-argument callable yielding records); returns the path.

  The callables may raise (e.g. `TooManyBadSamples` after their last record): tfds then
  leaves no complete dataset behind.
  """
  import tensorflow_datasets as tfds

  global _BUILDER
  if kind not in KINDS:
    raise ValueError(f"unknown kind {kind!r}; known: {sorted(KINDS)}")
  if _BUILDER is None:
    _BUILDER = _builder_class()
  tfds.disable_progress_bar()
  builder = _BUILDER(data_dir=out_dir, config=kind, file_format="array_record")
  builder.split_records = dict(split_records)
  builder.metadata = dict(metadata or {})
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(download_mode=tfds.GenerateMode.REUSE_CACHE_IF_EXISTS))
  return str(builder.data_dir)


def find_dataset(path: str) -> str:
  """The built dataset directory at or below `path` (the one holding dataset_info.json);
  local or gs:// (etils.epath: a walk, since object stores have no recursive glob)."""
  root = epath.Path(path)
  if (root / "dataset_info.json").exists():
    return str(path)
  found = sorted(str(d) for d, _, files in root.walk() if "dataset_info.json" in files)
  found = [f for f in found if "incomplete" not in f]
  if len(found) != 1:
    raise FileNotFoundError(f"expected one built dataset under {path}, found {found or 'none'}")
  return found[0]


class RecordSource:
  """Random-access Grain source of decoded records for one split of a built dataset.

  Pickles by path only; the reader and the feature decoder are opened lazily in each
  process (Grain ships sources to its worker processes).
  """

  def __init__(self, path: str, split: str):
    self.path, self.split = find_dataset(path), split
    self._reader = None
    self._features = None
    self._lock = threading.Lock()
    info = self._info()
    if split not in info.splits:
      raise KeyError(f"{self.path} has splits {list(info.splits)}, not {split!r}")
    self.kind = os.path.basename(os.path.dirname(self.path))
    self._files = [str(p) for p in info.splits[split].filepaths]
    self._len = int(info.splits[split].num_examples)
    self.metadata = dict(info.metadata or {})

  def _info(self):
    import tensorflow_datasets as tfds

    return tfds.builder_from_directory(self.path).info

  def __getstate__(self):
    return {"path": self.path, "split": self.split}

  def __setstate__(self, state):
    self.__init__(state["path"], state["split"])

  def __len__(self) -> int:
    return self._len

  def _open(self):
    from grain.sources import ArrayRecordDataSource

    with self._lock:  # Grain may read from several threads
      if self._reader is None:
        self._features = self._info().features
        self._reader = ArrayRecordDataSource(self._files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if self._reader is None:
      self._open()
    record = self._features.deserialize_example_np(self._reader[index])
    if isinstance(record["id"], bytes):
      record["id"] = record["id"].decode("utf-8", "replace")
    return record

  def __repr__(self) -> str:
    return f"RecordSource({self.path!r}, {self.split!r}, {self._len} records)"
