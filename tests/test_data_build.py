"""Builders: every raw layout -> ArrayRecord, bad inputs counted, failed builds incomplete,
and the embedded demo dataset."""

import hashlib
import json
import os

import numpy as np
import pytest

from mplug2_jax.data import build, demo, records
from mplug2_jax.data.bad_data import TooManyBadSamples


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  """A small folder of media: 3 mp4, 1 avi-less, 1 gif, 2 jpeg, plus broken files."""
  root = tmp_path_factory.mktemp("raw")
  rng = np.random.default_rng(0)
  clip = demo.render_clip(rng, "red", "circle", "left", 32, 8)
  for name in ("video0", "video1", "video2"):
    (root / f"{name}.mp4").write_bytes(demo.encode_mp4(clip))
  from PIL import Image
  frames = [Image.fromarray(f) for f in clip]
  frames[0].save(root / "tumblr_abc.gif", save_all=True, append_images=frames[1:])
  for name in ("a.jpg", "b.jpg"):
    (root / name).write_bytes(demo.encode_jpeg(clip[0]))
  (root / "empty.mp4").write_bytes(b"")
  (root / "broken.mp4").write_bytes(b"\x00" * 100)
  (root / "broken.jpg").write_bytes(b"garbage")
  return root


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _read(path, split):
  src = records.RecordSource(path, split)
  return sorted((src[i] for i in range(len(src))), key=lambda r: (r["id"], int(r["question_id"])))


def test_video_caption_train_and_test(raw, tmp_path):
  train = _jsonl(tmp_path / "train.jsonl", [{"video_id": "video0", "caption": "A man sings."},
                                            {"video_id": "video1", "caption": "a dog runs"}])
  test = _jsonl(tmp_path / "test.jsonl", [{"video_id": "video2",
                                           "golden_captions": ["One", "Two"]}])
  out = build.build("video_caption", str(tmp_path / "ds"), {"train": [train], "test": [test]},
                    str(raw))
  tr = _read(out, "train")
  assert [r["id"] for r in tr] == ["video0", "video1"]
  assert tr[0]["texts"] == [b"A man sings."] and tr[0]["media_format"] == b"mp4"
  assert tr[0]["media"] == (raw / "video0.mp4").read_bytes()
  assert _read(out, "test")[0]["texts"] == [b"One", b"Two"]  # raw; cleaned by the pipeline


def test_video_qa_question_ids_and_gif(raw, tmp_path):
  rows = [{"video_id": "video0", "question": "what?", "answer": "guitar"},
          {"video_id": "tumblr_abc", "question": "how many?", "answer": "2"},
          {"video_id": "missing_video", "question": "who?", "answer": "x"}]
  out = build.build("video_qa", str(tmp_path / "ds"),
                    {"test": [_jsonl(tmp_path / "q.jsonl", rows)]}, str(raw),
                    max_bad_fraction=0.5)
  recs = _read(out, "test")
  assert [(r["id"], r["question_id"], r["media_format"]) for r in recs] == [
      ("tumblr_abc", 1, b"gif"), ("video0", 0, b"mp4")]
  assert recs[1]["answers"] == [b"guitar"] and list(recs[1]["answer_weights"]) == [1.0]


def test_video_text_json_and_webvid_csv(raw, tmp_path):
  rows = [{"video_id": str(raw / "video0.mp4"), "caption": ["c1", "c2"], "start_time": 0.5,
           "end_time": 1.5}, {"video_id": "video1.mp4", "caption": "rel path"}]
  (tmp_path / "p.json").write_text(json.dumps(rows))
  (tmp_path / "w.csv").write_text("videoid,contentUrl,duration,page_dir,name\n"
                                  "video2,http://x,PT00H00M10S,,Aerial view\n")
  out = build.build("video_text", str(tmp_path / "ds"),
                    {"train": [str(tmp_path / "p.json"), str(tmp_path / "w.csv")]}, str(raw))
  recs = {r["texts"][0]: r for r in _read(out, "train")}
  assert set(recs) == {b"c1", b"rel path", b"Aerial view"}
  assert recs[b"c1"]["texts"] == [b"c1", b"c2"] and recs[b"c1"]["start_time"] == 0.5


def test_retrieval_and_image_text_groups(raw, tmp_path):
  rows = [{"clip_name": "video0", "caption": "x"}, {"video": "video1.mp4", "caption": "y"},
          {"clip_name": "video0", "caption": "z"}]
  out = build.build("video_retrieval", str(tmp_path / "r"),
                    {"train": [_jsonl(tmp_path / "r.jsonl", rows)]}, str(raw))
  groups = {r["texts"][0]: int(r["group_id"]) for r in _read(out, "train")}
  assert groups == {b"x": 0, b"z": 0, b"y": 1}
  (tmp_path / "i.json").write_text(json.dumps([
      {"image": "a.jpg", "caption": "first", "image_id": "coco_1"},
      {"image": "b.jpg", "caption": "second", "image_id": "coco_2"},
      {"image": "a.jpg", "caption": "third", "image_id": "coco_1"}]))
  out = build.build("image_text", str(tmp_path / "i"), {"train": [str(tmp_path / "i.json")]},
                    str(raw))
  groups = {r["texts"][0]: (int(r["group_id"]), r["media_format"]) for r in _read(out, "train")}
  assert groups == {b"first": (0, b"jpeg"), b"third": (0, b"jpeg"), b"second": (1, b"jpeg")}


def test_vqa_kinetics_grounding_text(raw, tmp_path):
  (tmp_path / "v.json").write_text(json.dumps([
      {"question_id": 7, "question": "Color?", "image": "a.jpg", "dataset": "vqa",
       "answer": ["red"] * 3 + ["blue"]},
      {"question_id": 8, "question": "Where?", "image": "b.jpg", "dataset": "vg",
       "answer": "water"}]))
  recs = _read(build.build("vqa", str(tmp_path / "v"), {"train": [str(tmp_path / "v.json")]},
                           str(raw)), "train")
  assert recs[0]["answers"] == [b"red", b"blue"]
  np.testing.assert_allclose(recs[0]["answer_weights"], [0.75, 0.25])
  assert list(recs[1]["answer_weights"]) == [0.5]

  kin = tmp_path / "kin"
  (kin / "dancing").mkdir(parents=True)
  (kin / "dancing" / "abc_000001_000011.mp4").write_bytes((raw / "video0.mp4").read_bytes())
  (kin / "zzz_000000_000010.mp4").write_bytes((raw / "video1.mp4").read_bytes())
  (tmp_path / "k.csv").write_text("label,youtube_id,time_start,time_end,split\n"
                                  "dancing,abc,1,11,train\nsinging,zzz,0,10,train\n")
  recs = _read(build.build("kinetics", str(tmp_path / "k"), {"train": [str(tmp_path / "k.csv")]},
                           str(kin)), "train")
  assert [(r["texts"][0], int(r["label"])) for r in recs] == [(b"dancing", 0), (b"singing", 1)]
  # A split without "dancing" keeps the dataset's indices (singing = 1, not 0).
  (tmp_path / "k_test.csv").write_text("label,youtube_id,time_start,time_end,split\n"
                                       "singing,zzz,0,10,test\n")
  out = build.build("kinetics", str(tmp_path / "k2"), {"train": [str(tmp_path / "k.csv")],
                                                      "test": [str(tmp_path / "k_test.csv")]},
                    str(kin))
  assert [int(r["label"]) for r in _read(out, "test")] == [1]

  torch = pytest.importorskip("torch")
  torch.save([("a.jpg", "x", [10, 20, 30, 40], "the red circle", "y")], tmp_path / "g.pth")
  recs = _read(build.build("grounding", str(tmp_path / "g"), {"val": [str(tmp_path / "g.pth")]},
                           str(raw)), "val")
  np.testing.assert_allclose(recs[0]["box"], [10, 20, 40, 60])  # xywh -> corners

  (tmp_path / "c.txt").write_bytes(b"first doc\n\nsecond doc\n\xff\xfe bad\n")
  with pytest.raises(TooManyBadSamples):
    build.build("text", str(tmp_path / "t"), {"train": [str(tmp_path / "c.txt")]})
  out = build.build("text", str(tmp_path / "t2"), {"train": [str(tmp_path / "c.txt")]},
                    max_bad_fraction=0.5)
  assert sorted(r["texts"][0] for r in _read(out, "train")) == [b"first doc", b"second doc"]


def test_bad_inputs_counted_and_failed_build_incomplete(raw, tmp_path):
  rows = [{"video_id": "video0", "caption": "ok"}, {"video_id": "nope", "caption": "missing"},
          {"video_id": "empty", "caption": "zero length"},
          {"video_id": "broken", "caption": "corrupt"}, {"video_id": "video1", "caption": "  "}]
  ann = _jsonl(tmp_path / "a.jsonl", rows)
  logs = []
  out = build.build("video_caption", str(tmp_path / "ok"), {"train": [ann]}, str(raw),
                    max_bad_fraction=0.9, log=logs.append)
  assert len(_read(out, "train")) == 1
  assert "'missing': 1" in logs[0] and "'empty': 1" in logs[0] and "'corrupt': 1" in logs[0]
  assert "'empty_text': 1" in logs[0]
  with pytest.raises(TooManyBadSamples, match="nope: missing"):
    build.build("video_caption", str(tmp_path / "bad"), {"train": [ann]}, str(raw),
                max_bad_fraction=0.5)
  with pytest.raises(FileNotFoundError):
    records.find_dataset(str(tmp_path / "bad"))  # nothing that looks complete


def test_build_cli(raw, tmp_path):
  ann = _jsonl(tmp_path / "a.jsonl", [{"video_id": "video0.mp4", "caption": "cli"}])
  build.main(["--kind", "video_text", "--videos", str(raw), "--annotations", ann,
              "--out", str(tmp_path / "cli")])
  assert records.RecordSource(str(tmp_path / "cli"), "train")[0]["texts"] == [b"cli"]


def test_demo_is_deterministic(tmp_path):
  def digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(os.path.join(root, "raw"))):
      for f in sorted(files):
        h.update(f.encode() + open(os.path.join(dirpath, f), "rb").read())
    return h.hexdigest()

  a = demo.make_demo(str(tmp_path / "a"), 6, 2, size=32, frames=8, log=lambda *_: None)
  demo.main(["--out", str(tmp_path / "b"), "--train", "6", "--test", "2", "--size", "32",
             "--frames", "8"])
  assert digest(tmp_path / "a") == digest(tmp_path / "b")
  assert set(a) == {"video_caption", "video_qa", "video_retrieval", "image_text",
                    "video_classification"}
  assert len(records.RecordSource(a["video_qa"], "train")) == 18
  assert len(records.RecordSource(a["video_caption"], "test")) == 2
  clips = records.RecordSource(a["video_classification"], "train")  # Kinetics layout
  assert len(clips) == 6 and all(0 <= int(clips[i]["label"]) < 4 for i in range(6))
