"""Importers: raw public/official layouts -> records of the common schema (`records.py`).

Spec: `shared/spec/datasets.md` sections 2, 3 and 5. Texts are stored **raw**; the official
cleaning (`pre_caption`, `pre_question`), prompts and lower-casing are applied by the
pipeline, so one built dataset serves several recipes. What each importer resolves:

  kind             annotation layout                                  media path
  video_caption    JSONL {video_id, caption} / {video_id, golden_captions}  root/id.mp4, else .avi
  video_qa         JSONL {video_id, question, answer}                 .gif if id starts "tumblr_",
                   question_id = line position over the files          else .mp4, else .avi
  video_text       JSON list / JSONL {video_id, caption, start_time,   video_id verbatim (joined to
                   end_time}; WebVid CSV (videoid, page_dir, name)      root when relative)
  video_retrieval  JSONL {clip_name | video, caption: str | [str]}     root/clip_name.mp4, else .avi
  image_text       JSON list {image, caption: str | [str], image_id?}  root/image
  vqa              JSON list {question_id, question, image, dataset,   root/image (vg: --vg_images)
                   answer: [str] | str}
  kinetics         CSV label,youtube_id,time_start,time_end,split      root[/label]/{id}_{s:06d}_{e:06d}.mp4
  grounding        TransVG .pth list of (file, _, [x,y,w,h], expr, _)   root/file
  text             plain text, one document per line                   -
  instruction      Owl2/LLaVA JSON list {id, image?, conversations:     root/image (none: text-only)
                   [{from, value}]}; stored as texts[0] = JSON

Every video kind accepts each official name of the video field (`video_id`, `clip_name`,
`video`; `VIDEO_FIELDS`); a missing field is named in the report.

Deliberate departures (datasets.md section 6 "decide explicitly"): a missing video is
skipped at build time and counted, so a sample never pairs a question with the next video
(the official QA retry does); everything else follows the official loaders.

Nothing in an annotation file runs code or reads outside the media folders:
  - `.pth` files are unpickled with `torch.load(weights_only=True)` (plain containers,
    numbers, strings, tensors, numeric numpy arrays); any other global is refused, naming
    the file (`load_torch_annotations`);
  - a media path must resolve, symlinks followed, inside `--videos` / `--images` /
    `--vg_images` (an absolute `video_id` included) and be a regular file; else the record
    is counted as `outside_root` / `not_a_file` (`MediaReader`).
A malformed record (not JSON, a missing or mistyped field, a lone surrogate) is counted as
`bad_annotation` with its file, line and record id; a text with no visible character as
`empty_text`; a sampling window outside the clip as `time_out_of_range`. Only the
`max_bad_fraction` limit fails a whole build.
"""

from __future__ import annotations

import csv
import json
import math
import os
import stat
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from mplug2_jax.data import media as media_lib
from mplug2_jax.data.bad_data import BadDataCounter

Record = dict[str, Any]


# --------------------------------------------------------------------------------------
# Reading annotation files.
# --------------------------------------------------------------------------------------


class AnnotationError(ValueError):
  """A malformed annotation record (a missing or mistyped field); counted as
  `bad_annotation` with its file and line, the build goes on."""


BAD_LINE = object()  # stands for a JSONL line that is not JSON: later positions keep
                    # their index (the official question_id is the line position)


class Annotations(list):
  """Annotation records plus where each came from (`where[i]`: "file:line", or
  "file[row]" for CSV rows, which may span lines)."""

  def __init__(self, items=(), where=()):
    super().__init__(items)
    self.where = list(where)

  def extend_from(self, other: "Annotations") -> None:
    self.extend(other)
    self.where.extend(other.where)


def location(anns: Sequence[Any], i: int) -> str:
  where = getattr(anns, "where", None)
  return where[i] if where and i < len(where) else f"record {i}"


def _json_list_with_lines(path: str, text: str) -> Annotations | None:
  """A top-level JSON list parsed element by element, so each record knows its line;
  None when the file is not a list (parsed whole by the caller)."""
  decoder = json.JSONDecoder()
  i = len(text) - len(text.lstrip())
  if not text.startswith("[", i):
    return None
  out = Annotations()
  i += 1
  line = 1 + text.count("\n", 0, i)
  last = i
  while True:
    while i < len(text) and text[i] in " \t\r\n,":
      i += 1
    if i >= len(text) or text[i] == "]":
      break
    line += text.count("\n", last, i)
    value, end = decoder.raw_decode(text, i)
    out.append(value)
    out.where.append(f"{path}:{line}")
    last, i = i, end
  return out


def read_annotations(path: str, counter: BadDataCounter | None = None) -> Annotations:
  """JSONL (one object a line), JSON (a list, or an object of lists), CSV/TSV (dict rows).

  A JSONL line that is not JSON is counted in `counter` as `bad_annotation` (file:line),
  or raises naming them without a counter; a JSON file that does not parse cannot be
  split into records and raises naming the file, line and column.
  """
  if path.endswith(".jsonl"):
    out = Annotations()
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError as e:
          detail = f"{path}:{n}: not JSON ({e.msg} at column {e.colno})"
          if counter is None:
            raise ValueError(detail) from None
          counter.add_bad(f"{path}:{n}", "bad_annotation", detail)
          out.append(BAD_LINE)
        out.where.append(f"{path}:{n}")
    return out
  if path.endswith((".csv", ".tsv")):
    with open(path, encoding="utf-8", newline="") as f:
      rows = list(csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ","))
    return Annotations(rows, [f"{path}[row {i + 1}]" for i in range(len(rows))])
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    listed = _json_list_with_lines(path, text)
    if listed is not None:
      return listed
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}:{e.colno}: not JSON ({e.msg}); the file cannot be "
                     "split into records, fix it or leave it out") from None
  return Annotations(data, [f"{path}[{k!r}]" for k in data] if isinstance(data, dict) else ())


def read_all(paths: Sequence[str], counter: BadDataCounter | None = None) -> Annotations:
  """Files are concatenated in order, as the official loaders do."""
  out = Annotations()
  for p in paths:
    out.extend_from(read_annotations(p, counter))
  return out


def media_format(path: str) -> str:
  ext = os.path.splitext(path)[1].lower().lstrip(".")
  return "jpeg" if ext == "jpg" else ext


def first_existing(candidates: Sequence[str]) -> str:
  """The first candidate path that exists, else the first (reported as missing)."""
  for c in candidates:
    if os.path.exists(c):
      return c
  return candidates[0]


# --------------------------------------------------------------------------------------
# Reading media: only regular files inside the media roots.
# --------------------------------------------------------------------------------------


class MediaReader:
  """Reads media files for the builders, counting bad ones instead of failing.

  A path is opened only when it resolves (symlinks followed) inside one of `roots` (the
  `--videos` / `--images` / `--vg_images` folders; "" = the current directory) and is a
  regular file: an annotation naming "/etc/passwd", "../../x" or a symlink out of the
  folder is counted as `outside_root`, a FIFO or a directory as `not_a_file` (opened
  non-blocking, so a FIFO cannot hang the build).
  """

  def __init__(self, counter: BadDataCounter, verify: bool = True,
               roots: Sequence[str] = ("",)):
    self.counter, self.verify = counter, verify
    self.roots = [os.path.realpath(r or ".") for r in roots]

  def inside(self, path: str) -> bool:
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, r]) == r for r in self.roots)

  def __call__(self, path: str, record_id: str) -> bytes | None:
    if not self.inside(path):
      self.counter.add_bad(record_id, "outside_root",
                           f"{path} resolves to {os.path.realpath(path)}, outside "
                           f"{' and '.join(self.roots)}")
      return None
    if not os.path.lexists(path):
      self.counter.add_bad(record_id, "missing", path)
      return None
    data = self._read_regular(os.path.realpath(path), record_id, path)
    if data is None:
      return None
    if not data:
      self.counter.add_bad(record_id, "empty", path)
      return None
    if self.verify:
      try:
        check_media(data, media_format(path))
      except media_lib.BadSample as e:
        self.counter.add_bad(record_id, e.reason, f"{path}: {e.detail}")
        return None
    return data

  def _read_regular(self, real: str, record_id: str, path: str) -> bytes | None:
    try:
      fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
      self.counter.add_bad(record_id, "missing", f"{path}: {e.strerror}")
      return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO, a directory, a device
      os.close(fd)
      self.counter.add_bad(record_id, "not_a_file", f"{path} is not a regular file")
      return None
    with os.fdopen(fd, "rb") as f:
      return f.read()


def check_media(data: bytes, fmt: str) -> None:
  """Cheap validity check: images fully decoded, videos opened and frames counted."""
  if fmt in media_lib.IMAGE_FORMATS:
    media_lib.decode_image(data)
  elif fmt == "gif":
    media_lib.decode_gif(data, 1, "middle", None)
  else:
    if media_lib.video_length(data) <= 0:
      raise media_lib.BadSample("no_frames", "zero frames")


# --------------------------------------------------------------------------------------
# Fields of one record: a missing or mistyped one raises AnnotationError naming it.
# --------------------------------------------------------------------------------------

# The names the official layouts give the video of a record (datasets.md sections 2.1-2.5:
# `video_id` for QA, captioning and pre-training, `clip_name` or `video` for retrieval);
# every video kind accepts each of them.
VIDEO_FIELDS = ("video_id", "clip_name", "video")


def _unicode(value: str, field: str) -> str:
  try:
    value.encode("utf-8")
  except UnicodeEncodeError:
    raise AnnotationError(f"field {field!r} is not valid Unicode (a lone surrogate)") from None
  return value


def _field(a: Any, names: Sequence[str]) -> tuple[str, Any]:
  """(name, value) of the first of `names` present in record `a`."""
  if not isinstance(a, Mapping):
    raise AnnotationError(f"expected an object with field {names[0]!r}, got "
                          f"{type(a).__name__}")
  for name in names:
    if name in a and a[name] is not None:
      return name, a[name]
  also = f" (also accepted: {', '.join(repr(n) for n in names[1:])})" if names[1:] else ""
  raise AnnotationError(f"missing field {names[0]!r}{also}")


def _id(a: Any, names: Sequence[str]) -> str:
  name, value = _field(a, names)
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise AnnotationError(f"field {name!r} must be a string, got {type(value).__name__}")
  value = _unicode(str(value), name)
  if not value:
    raise AnnotationError(f"field {name!r} is empty")
  return value


def _video_stem(a: Any) -> str:
  """The file stem of a record's video: `clip_name` / `video_id` as given, `video` cut at
  its first "." (the official retrieval rule, VD:49-51)."""
  name, _ = _field(a, VIDEO_FIELDS)
  value = _id(a, (name,))
  return value.split(".")[0] if name == "video" else value


def _texts(a: Any, names: Sequence[str]) -> list[str]:
  """A string or a list of strings."""
  name, value = _field(a, names)
  values = [value] if isinstance(value, str) else value
  if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
    raise AnnotationError(f"field {name!r} must be a string or a list of strings, got "
                          f"{value!r:.40}")
  return [_unicode(v, name) for v in values]


def _seconds(a: Any, name: str, required: bool = False) -> float:
  value = _field(a, (name,))[1] if required else (a.get(name, 0) or 0)
  try:
    return float(value)
  except (TypeError, ValueError):
    raise AnnotationError(f"field {name!r} must be a number of seconds, got "
                          f"{value!r:.40}") from None


def _check_texts(texts: list[str], counter: BadDataCounter, record_id: str) -> bool:
  """No text, or a text with no visible character (`text.is_blank`), is `empty_text`."""
  from mplug2_jax.data.text import is_blank

  if not texts or any(is_blank(t) for t in texts):
    counter.add_bad(record_id, "empty_text", repr(texts)[:80])
    return False
  return True


def _each(anns: Sequence[Any], read: "MediaReader",
          one: Callable[[int, Any], Record | None]) -> Iterator[Record]:
  """`one(i, record)` for every annotation; a malformed one (AnnotationError, or a type or
  value the importer cannot use) is counted as `bad_annotation` with its file, line and
  record id, and the build goes on."""
  for i, a in enumerate(anns):
    if a is BAD_LINE:  # counted when the file was read
      continue
    try:
      record = one(i, a)
    except (AnnotationError, KeyError, TypeError, ValueError, IndexError) as e:
      rid = ""
      if isinstance(a, Mapping):
        rid = next((f"record {a[k]!r:.60}: " for k in VIDEO_FIELDS + ("image", "id")
                    if k in a), "")
      problem = str(e) if isinstance(e, AnnotationError) else f"{type(e).__name__}: {e}"
      read.counter.add_bad(location(anns, i), "bad_annotation", rid + problem)
      continue
    if record is not None:
      yield record


# --------------------------------------------------------------------------------------
# Importers: each yields records and counts bad inputs in `counter`.
# --------------------------------------------------------------------------------------


def video_caption(anns: list[Record], root: str, read: MediaReader) -> Iterator[Record]:
  def one(i, a):
    vid = _video_stem(a)
    texts = (_texts(a, ("golden_captions",)) if "golden_captions" in a
             else _texts(a, ("caption", "golden_captions")))
    if not _check_texts(texts, read.counter, vid):
      return None
    path = first_existing([os.path.join(root, vid + ext) for ext in (".mp4", ".avi")])
    data = read(path, vid)
    if data is not None:
      return dict(id=vid, media=data, media_format=media_format(path), texts=texts)

  return _each(anns, read, one)


def video_qa(anns: list[Record], root: str, read: MediaReader) -> Iterator[Record]:
  def one(qid, a):
    vid = _video_stem(a)
    question = _texts(a, ("question",))
    answers = _texts(a, ("answer",)) if a.get("answer") is not None else []
    if not _check_texts(question[:1], read.counter, f"{vid}#{qid}"):
      return None
    if vid.split("_")[0] == "tumblr":
      candidates = [os.path.join(root, vid + ".gif")]
    else:
      candidates = [os.path.join(root, vid + ext) for ext in (".mp4", ".avi")]
    path = first_existing(candidates)
    data = read(path, f"{vid}#{qid}")
    if data is None:
      return None
    return dict(id=vid, media=data, media_format=media_format(path), texts=question[:1],
                answers=answers, answer_weights=[1.0] * len(answers), question_id=qid)

  return _each(anns, read, one)


def video_text(anns: list[Record], root: str, read: MediaReader) -> Iterator[Record]:
  def one(i, a):
    if isinstance(a, Mapping) and "videoid" in a:  # WebVid CSV row
      rel = os.path.join(a.get("page_dir") or "", f"{_id(a, ('videoid',))}.mp4")
      texts = _texts(a, ("name",))
      start = end = 0.0
    else:
      name, _ = _field(a, VIDEO_FIELDS)
      rel, texts = _id(a, (name,)), _texts(a, ("caption",))
      start, end = _seconds(a, "start_time"), _seconds(a, "end_time")
    path = rel if os.path.isabs(rel) else os.path.join(root, rel)
    if not _check_texts(texts, read.counter, rel):
      return None
    if not (math.isfinite(start) and math.isfinite(end) and start >= 0 and end >= 0) or (
        start and end and end <= start):
      read.counter.add_bad(rel, "time_out_of_range", f"window [{start:g}, {end:g}] s")
      return None
    data = read(path, rel)
    if data is None:
      return None
    fmt = media_format(path)
    if start and read.verify and fmt in media_lib.VIDEO_FORMATS:
      frames, fps = media_lib.video_frames_and_rate(data)
      if int(start * fps) >= frames:  # `decode_video` would refuse it
        read.counter.add_bad(rel, "time_out_of_range",
                             f"start_time {start:g}s, the clip lasts {frames / fps:.2f}s")
        return None
    return dict(id=rel, media=data, media_format=fmt, texts=texts, start_time=start,
                end_time=end)

  return _each(anns, read, one)


def video_retrieval(anns: list[Record], root: str, read: MediaReader) -> Iterator[Record]:
  groups: dict[str, int] = {}

  def one(i, a):
    clip = _video_stem(a)
    group = groups.setdefault(clip, len(groups))
    texts = _texts(a, ("caption",))
    if not _check_texts(texts, read.counter, clip):
      return None
    path = first_existing([os.path.join(root, clip + ext) for ext in (".mp4", ".avi")])
    data = read(path, clip)
    if data is not None:
      return dict(id=clip, media=data, media_format=media_format(path), texts=texts,
                  group_id=group)

  return _each(anns, read, one)


def image_text(anns: list[Record], root: str, read: MediaReader) -> Iterator[Record]:
  groups: dict[Any, int] = {}

  def one(i, a):
    image = _id(a, ("image",))
    texts = _texts(a, ("caption",))
    group = groups.setdefault(a.get("image_id", image), len(groups))
    if not _check_texts(texts, read.counter, image):
      return None
    path = os.path.join(root, image)
    data = read(path, image)
    if data is not None:
      return dict(id=image, media=data, media_format=media_format(path), texts=texts,
                  group_id=group)

  return _each(anns, read, one)


def vqa(anns: list[Record], root: str, read: MediaReader, vg_root: str | None = None,
        ) -> Iterator[Record]:
  from mplug2_jax.data.text import vqa_answer_weights

  def one(i, a):
    qid = int(a.get("question_id", -1))
    dataset = a.get("dataset", "vqa")
    image = _id(a, ("image",))
    rid = f"{image}#{qid}"
    question = _texts(a, ("question",))
    answers, weights = (vqa_answer_weights(_texts(a, ("answer",)), dataset)
                        if "answer" in a else ([], []))
    if not _check_texts(question[:1], read.counter, rid):
      return None
    path = os.path.join(vg_root if dataset in ("vg", "gqa") and vg_root else root, image)
    data = read(path, rid)
    if data is None:
      return None
    return dict(id=rid, media=data, media_format=media_format(path), texts=question[:1],
                answers=answers, answer_weights=weights, question_id=qid)

  return _each(anns, read, one)


def kinetics(anns: list[Record], root: str, read: MediaReader,
             classes: Sequence[str] | None = None) -> Iterator[Record]:
  """`classes`: the label list of the whole dataset (index = label id); default: the
  sorted labels of these annotations."""
  classes = {c: i for i, c in enumerate(classes or kinetics_classes(anns))}

  def one(i, a):
    yid, label = _id(a, ("youtube_id",)), _id(a, ("label",))
    name = (f"{yid}_{int(_seconds(a, 'time_start', True)):06d}_"
            f"{int(_seconds(a, 'time_end', True)):06d}.mp4")
    path = first_existing([os.path.join(root, label, name), os.path.join(root, name),
                           os.path.join(root, label, yid + ".mp4"),
                           os.path.join(root, yid + ".mp4")])  # a flat folder of clips
    data = read(path, name)
    if data is not None:
      return dict(id=name, media=data, media_format="mp4", texts=[label],
                  label=classes[label])

  return _each(anns, read, one)


def kinetics_classes(anns: Sequence[Any]) -> list[str]:
  """The sorted labels of Kinetics rows (rows without one are counted bad later)."""
  return sorted({a["label"] for a in anns if isinstance(a, Mapping) and a.get("label")})


def grounding(anns: list[Any], root: str, read: MediaReader,
              box_format: str = "xywh") -> Iterator[Record]:
  """TransVG split tuples -> records with corner boxes (x1, y1, x2, y2) in pixels.

  datasets.md 3.5 (GD:287-291): RefCOCO / RefCOCO+ / RefCOCOg 5-tuples (image, _, box,
  expression, _) carry [x, y, w, h] (`box_format="xywh"`, the default); ReferIt has the
  same 5-tuple with corners already (`box_format="xyxy"`); Flickr 3-tuples (image, box,
  expression) always carry corners. The geometry and the box tokens are applied by the
  pipeline (data/grounding.py), so one build serves training and evaluation.
  """
  if box_format not in ("xywh", "xyxy"):
    raise ValueError(f"grounding box_format {box_format!r}: 'xywh' (RefCOCO family) or "
                     "'xyxy' (ReferIt)")

  def one(i, t):
    if not isinstance(t, (list, tuple)) or len(t) < 3:
      raise AnnotationError(f"expected a (image, box, expression) or (image, _, box, "
                            f"expression, _) tuple, got {t!r:.60}")
    if len(t) == 3:
      image, box, expression = t
      box = np.asarray(box, np.float32)
    else:
      image, _, box, expression = t[:4]
      box = np.asarray(box, np.float64)
      if box_format == "xywh" and box.shape == (4,):
        box = np.concatenate([box[:2], box[:2] + box[2:]])
      box = box.astype(np.float32)
    if box.shape != (4,) or not np.all(np.isfinite(box)):
      raise AnnotationError(f"box must be 4 finite numbers, got {box.tolist()!r:.60}")
    if not isinstance(image, str) or not isinstance(expression, str):
      raise AnnotationError("image and expression must be strings")
    image, expression = _unicode(image, "image"), _unicode(expression, "expression")
    rid = f"{image}#{i}"
    if not _check_texts([expression], read.counter, rid):
      return None
    path = os.path.join(root, image)
    data = read(path, rid)
    if data is not None:
      return dict(id=rid, media=data, media_format=media_format(path), texts=[expression],
                  box=box)

  return _each(anns, read, one)


def text_corpus(paths: Sequence[str], read: MediaReader) -> Iterator[Record]:
  for path in paths:
    with open(path, "rb") as f:
      for n, line in enumerate(f):
        rid = f"{os.path.basename(path)}:{n + 1}"
        try:
          text = line.decode("utf-8").strip()
        except UnicodeDecodeError:
          read.counter.add_bad(rid, "bad_text", "not UTF-8")
          continue
        if not text:
          continue  # blank lines separate documents; not an error
        yield dict(id=rid, texts=[text])


def instruction(anns: list[Record], root: str, read: MediaReader) -> Iterator[Record]:
  """mPLUG-Owl2 instruction JSON (datasets.md 4.1): the cleaned conversation is stored as
  JSON in texts[0]; `instruction.import_conversation` says which records are bad. A missing
  image is counted and skipped (officially a random other sample is used instead)."""
  from mplug2_jax.data import instruction as instruction_lib

  def one(i, a):
    a = a if isinstance(a, dict) else {"conversations": None}  # malformed -> bad_text below
    rid = str(a.get("id", i))
    image = a.get("image")  # absent: a text-only conversation
    try:
      turns = instruction_lib.import_conversation(a.get("conversations"), image is not None)
    except media_lib.BadSample as e:
      read.counter.add_bad(rid, e.reason, e.detail)
      return None
    record = dict(id=rid, texts=[json.dumps(turns, ensure_ascii=False)])
    if image is None:
      return record
    if not image:  # "" would name the image folder itself
      read.counter.add_bad(rid, "missing", "empty image path")
      return None
    path = os.path.join(root, str(image))
    data = read(path, rid)
    if data is not None:
      return dict(record, media=data, media_format=media_format(path))

  return _each(anns, read, one)


def _safe_torch_globals() -> list[Any]:
  """What an annotation .pth may hold beyond torch's weights-only types (dict, list,
  tuple, str, numbers, None, tensors): numpy arrays of numbers, which some TransVG split
  files use for boxes. Nothing here calls code named by the file."""
  try:
    reconstruct = np._core.multiarray._reconstruct
  except AttributeError:  # numpy < 2
    reconstruct = np.core.multiarray._reconstruct
  dtypes = [type(np.dtype(t)) for t in ("float32", "float64", "int32", "int64", "uint8")]
  return [reconstruct, np.ndarray, np.dtype, *dtypes]


def load_torch_annotations(path: str) -> Annotations:
  """A torch-pickled annotation list read without running code from it.

  `torch.load(weights_only=True)` only rebuilds plain containers, numbers, strings and
  tensors (plus the numpy arrays of `_safe_torch_globals`); a file whose pickle names any
  other callable (e.g. `os.system` through `__reduce__`) is refused, naming the file.
  """
  import pickle

  import torch  # only needed for the TransVG .pth split files

  try:
    with torch.serialization.safe_globals(_safe_torch_globals()):
      data = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    reason = next((line.strip() for line in str(e).splitlines()
                   if "GLOBAL" in line or "Unsupported" in line), str(e).splitlines()[0])
    raise ValueError(f"{path}: refused to unpickle: it names code to run, not only data "
                     f"({reason})") from None
  if not isinstance(data, (list, tuple)):
    raise ValueError(f"{path}: expected a list of annotation tuples, got "
                     f"{type(data).__name__}")
  return Annotations(data, [f"{path}[{i}]" for i in range(len(data))])


def load(kind: str, paths: Sequence[str], counter: BadDataCounter | None = None) -> Annotations:
  """Annotations for `kind` (grounding split files are torch pickles, read safely)."""
  if kind == "grounding":
    out = Annotations()
    for p in paths:
      out.extend_from(load_torch_annotations(p))
    return out
  return read_all(paths, counter)


IMPORTERS: dict[str, Callable[..., Iterator[Record]]] = {
    "video_caption": video_caption, "video_qa": video_qa, "video_text": video_text,
    "video_retrieval": video_retrieval, "image_text": image_text, "vqa": vqa,
    "kinetics": kinetics, "grounding": grounding,
    "instruction": instruction,
}


def records(kind: str, paths: Sequence[str], root: str, counter: BadDataCounter,
            verify: bool = True, **kwargs) -> Iterator[Record]:
  """All records of one split; counts good/bad in `counter` and checks the limit at the end."""
  roots = [root] + ([kwargs["vg_root"]] if kwargs.get("vg_root") else [])
  read = MediaReader(counter, verify, roots)
  if kind == "text":
    it = text_corpus(paths, read)
  else:
    it = IMPORTERS[kind](load(kind, paths, counter), root, read, **kwargs)
  for r in it:
    counter.add_good()
    yield r
  counter.check(final=True)
