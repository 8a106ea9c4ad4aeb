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

Deliberate departures (datasets.md section 6 "decide explicitly"): a missing video is
skipped at build time and counted, so a sample never pairs a question with the next video
(the official QA retry does); everything else follows the official loaders.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from mplug2_jax.data import media as media_lib
from mplug2_jax.data.bad_data import BadDataCounter

Record = dict[str, Any]


# --------------------------------------------------------------------------------------
# Reading annotation files and media.
# --------------------------------------------------------------------------------------


def read_annotations(path: str) -> list[Any]:
  """JSONL (one object a line), JSON (a list, or an object of lists), CSV/TSV (dict rows)."""
  if path.endswith(".jsonl"):
    with open(path, encoding="utf-8") as f:
      return [json.loads(line) for line in f if line.strip()]
  if path.endswith((".csv", ".tsv")):
    with open(path, encoding="utf-8", newline="") as f:
      return list(csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ","))
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  return data


def read_all(paths: Sequence[str]) -> list[Any]:
  """Files are concatenated in order, as the official loaders do."""
  out: list[Any] = []
  for p in paths:
    out.extend(read_annotations(p))
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


class MediaReader:
  """Reads media files for the builders, counting bad ones instead of failing."""

  def __init__(self, counter: BadDataCounter, verify: bool = True):
    self.counter, self.verify = counter, verify

  def __call__(self, path: str, record_id: str) -> bytes | None:
    if not os.path.exists(path):
      self.counter.add_bad(record_id, "missing", path)
      return None
    with open(path, "rb") as f:
      data = f.read()
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


def check_media(data: bytes, fmt: str) -> None:
  """Cheap validity check: images fully decoded, videos opened and frames counted."""
  if fmt in media_lib.IMAGE_FORMATS:
    media_lib.decode_image(data)
  elif fmt == "gif":
    media_lib.decode_gif(data, 1, "middle", None)
  else:
    if media_lib.video_length(data) <= 0:
      raise media_lib.BadSample("no_frames", "zero frames")


def _texts(value: Any) -> list[str]:
  return [value] if isinstance(value, str) else list(value or [])


def _check_texts(texts: list[str], counter: BadDataCounter, record_id: str) -> bool:
  if not texts or not all(t.strip() for t in texts):
    counter.add_bad(record_id, "empty_text", repr(texts)[:80])
    return False
  return True


# --------------------------------------------------------------------------------------
# Importers: each yields records and counts bad inputs in `counter`.
# --------------------------------------------------------------------------------------


def video_caption(anns: list[Record], root: str, read: MediaReader) -> Iterator[Record]:
  for a in anns:
    vid = str(a["video_id"])
    texts = _texts(a["golden_captions"] if "golden_captions" in a else a.get("caption"))
    if not _check_texts(texts, read.counter, vid):
      continue
    path = first_existing([os.path.join(root, vid + ext) for ext in (".mp4", ".avi")])
    data = read(path, vid)
    if data is not None:
      yield dict(id=vid, media=data, media_format=media_format(path), texts=texts)


def video_qa(anns: list[Record], root: str, read: MediaReader) -> Iterator[Record]:
  for qid, a in enumerate(anns):
    vid = str(a["video_id"])
    if not _check_texts([a.get("question", "")], read.counter, f"{vid}#{qid}"):
      continue
    if vid.split("_")[0] == "tumblr":
      candidates = [os.path.join(root, vid + ".gif")]
    else:
      candidates = [os.path.join(root, vid + ext) for ext in (".mp4", ".avi")]
    path = first_existing(candidates)
    data = read(path, f"{vid}#{qid}")
    if data is None:
      continue
    answers = _texts(a.get("answer", []))
    yield dict(id=vid, media=data, media_format=media_format(path), texts=[a["question"]],
               answers=answers, answer_weights=[1.0] * len(answers), question_id=qid)


def video_text(anns: list[Record], root: str, read: MediaReader) -> Iterator[Record]:
  for a in anns:
    if "videoid" in a:  # WebVid CSV row
      rel, caption = os.path.join(a.get("page_dir", ""), f"{a['videoid']}.mp4"), a["name"]
      start = end = 0.0
    else:
      rel, caption = str(a["video_id"]), a["caption"]
      start, end = float(a.get("start_time", 0) or 0), float(a.get("end_time", 0) or 0)
    path = rel if os.path.isabs(rel) else os.path.join(root, rel)
    texts = _texts(caption)
    if not _check_texts(texts, read.counter, rel):
      continue
    data = read(path, rel)
    if data is not None:
      yield dict(id=rel, media=data, media_format=media_format(path), texts=texts,
                 start_time=start, end_time=end)


def video_retrieval(anns: list[Record], root: str, read: MediaReader) -> Iterator[Record]:
  groups: dict[str, int] = {}
  for a in anns:
    clip = str(a["clip_name"]) if "clip_name" in a else str(a["video"]).split(".")[0]
    group = groups.setdefault(clip, len(groups))
    texts = _texts(a["caption"])
    if not _check_texts(texts, read.counter, clip):
      continue
    path = first_existing([os.path.join(root, clip + ext) for ext in (".mp4", ".avi")])
    data = read(path, clip)
    if data is not None:
      yield dict(id=clip, media=data, media_format=media_format(path), texts=texts,
                 group_id=group)


def image_text(anns: list[Record], root: str, read: MediaReader) -> Iterator[Record]:
  groups: dict[Any, int] = {}
  for a in anns:
    image = str(a["image"])
    group = groups.setdefault(a.get("image_id", image), len(groups))
    texts = _texts(a["caption"])
    if not _check_texts(texts, read.counter, image):
      continue
    path = os.path.join(root, image)
    data = read(path, image)
    if data is not None:
      yield dict(id=image, media=data, media_format=media_format(path), texts=texts,
                 group_id=group)


def vqa(anns: list[Record], root: str, read: MediaReader, vg_root: str | None = None,
        ) -> Iterator[Record]:
  from mplug2_jax.data.text import vqa_answer_weights

  for a in anns:
    qid = int(a.get("question_id", -1))
    dataset = a.get("dataset", "vqa")
    rid = f"{a['image']}#{qid}"
    if not _check_texts([a.get("question", "")], read.counter, rid):
      continue
    path = os.path.join(vg_root if dataset in ("vg", "gqa") and vg_root else root, a["image"])
    data = read(path, rid)
    if data is None:
      continue
    answers, weights = vqa_answer_weights(a["answer"], dataset) if "answer" in a else ([], [])
    yield dict(id=rid, media=data, media_format=media_format(path), texts=[a["question"]],
               answers=answers, answer_weights=weights, question_id=qid)


def kinetics(anns: list[Record], root: str, read: MediaReader,
             classes: Sequence[str] | None = None) -> Iterator[Record]:
  """`classes`: the label list of the whole dataset (index = label id); default: the
  sorted labels of these annotations."""
  classes = {c: i for i, c in enumerate(classes or sorted({a["label"] for a in anns}))}
  for a in anns:
    yid, label = a["youtube_id"], a["label"]
    name = f"{yid}_{int(float(a['time_start'])):06d}_{int(float(a['time_end'])):06d}.mp4"
    path = first_existing([os.path.join(root, label, name), os.path.join(root, name),
                           os.path.join(root, label, yid + ".mp4"),
                           os.path.join(root, yid + ".mp4")])  # a flat folder of clips
    data = read(path, name)
    if data is not None:
      yield dict(id=name, media=data, media_format="mp4", texts=[label],
                 label=classes[label])


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
  for i, t in enumerate(anns):
    if len(t) == 3:
      image, box, expression = t
      box = np.asarray(box, np.float32)
    else:
      image, _, box, expression = t[:4]
      if box_format == "xywh":
        x, y, w, h = (float(v) for v in box)
        box = np.array([x, y, x + w, y + h], np.float32)
      else:
        box = np.asarray(box, np.float32)
    rid = f"{image}#{i}"
    if not _check_texts([expression], read.counter, rid):
      continue
    path = os.path.join(root, image)
    data = read(path, rid)
    if data is not None:
      yield dict(id=rid, media=data, media_format=media_format(path), texts=[expression],
                 box=box)


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

  for i, a in enumerate(anns):
    a = a if isinstance(a, dict) else {"conversations": None}  # malformed -> bad_text below
    rid = str(a.get("id", i))
    image = a.get("image")  # absent: a text-only conversation
    try:
      turns = instruction_lib.import_conversation(a.get("conversations"), image is not None)
    except media_lib.BadSample as e:
      read.counter.add_bad(rid, e.reason, e.detail)
      continue
    record = dict(id=rid, texts=[json.dumps(turns, ensure_ascii=False)])
    if image is None:
      yield record
      continue
    if not image:  # "" would name the image folder itself
      read.counter.add_bad(rid, "missing", "empty image path")
      continue
    path = os.path.join(root, str(image))
    data = read(path, rid)
    if data is not None:
      yield dict(record, media=data, media_format=media_format(path))


def load(kind: str, paths: Sequence[str]) -> list[Any]:
  """Annotations for `kind` (grounding split files are torch pickles)."""
  if kind == "grounding":
    import torch  # only needed for the TransVG .pth split files

    out: list[Any] = []
    for p in paths:
      out.extend(torch.load(p, weights_only=False))
    return out
  return read_all(paths)


IMPORTERS: dict[str, Callable[..., Iterator[Record]]] = {
    "video_caption": video_caption, "video_qa": video_qa, "video_text": video_text,
    "video_retrieval": video_retrieval, "image_text": image_text, "vqa": vqa,
    "kinetics": kinetics, "grounding": grounding,
    "instruction": instruction,
}


def records(kind: str, paths: Sequence[str], root: str, counter: BadDataCounter,
            verify: bool = True, **kwargs) -> Iterator[Record]:
  """All records of one split; counts good/bad in `counter` and checks the limit at the end."""
  read = MediaReader(counter, verify)
  if kind == "text":
    it = text_corpus(paths, read)
  else:
    it = IMPORTERS[kind](load(kind, paths), root, read, **kwargs)
  for r in it:
    counter.add_good()
    yield r
  counter.check(final=True)
