"""mPLUG-Owl2 instruction data: Vicuna-v1 template, official loss mask, image marker,
truncation, collation, image preprocessing, and the `instruction` build round trip."""

import io
import json

import numpy as np
import pytest

from mplug2_jax.data import build, instruction, records, spm
from mplug2_jax.data.instruction import IGNORE_INDEX, IMAGE_TOKEN_ID

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
          "assistant gives helpful, detailed, and polite answers to the user's questions.")
IMAGE_CHAT = [  # a leading assistant turn (dropped) and a marker to move to the front
    {"from": "gpt", "value": "Hello there."},
    {"from": "human", "value": "What is on the table? <|image|>"},
    {"from": "gpt", "value": "A laptop and a cup of coffee."},
    {"from": "human", "value": "What colour is the cup?"},
    {"from": "gpt", "value": "White"}]
TEXT_CHAT = [{"from": "human", "value": "Name a prime."}, {"from": "gpt", "value": "7"},
             {"from": "human", "value": "And another one?"},
             {"from": "gpt", "value": "Eleven is prime too."}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  """A tiny LLaMA-layout SentencePiece model (BPE, byte fallback, whitespace kept)."""
  root = tmp_path_factory.mktemp("spm")
  rng = np.random.default_rng(0)
  words = " ".join([SYSTEM] + [t["value"] for t in IMAGE_CHAT + TEXT_CHAT]
                   + ["USER: ASSISTANT: describe the image red circle"]).split()
  lines = [" ".join(rng.choice(words, 10)) for _ in range(3000)] + [SYSTEM] * 50
  (root / "corpus.txt").write_text("\n".join(lines) + "\n")
  path = spm.train([str(root / "corpus.txt")], str(root / "llama"), 600, model_type="bpe",
                   layout="llama")
  t = spm.SentencePieceTokenizer(path)
  assert (t.unk_id, t.bos_id, t.eos_id) == (0, 1, 2)
  return t


def _answers(example, tok):
  """The supervised label tokens, split at each (supervised) </s> and decoded."""
  labels = example["labels"]
  kept = labels[labels != IGNORE_INDEX]
  assert kept[-1] == tok.eos_id  # every answer is followed by its </s>
  ends = np.flatnonzero(kept == tok.eos_id)
  starts = np.concatenate([[0], ends[:-1] + 1])
  return [tok.decode(kept[s:e]) for s, e in zip(starts, ends)]


def test_render_vicuna_v1():
  turns = instruction.clean_conversation(IMAGE_CHAT, has_image=True)
  assert instruction.render(turns) == (
      SYSTEM + " USER: <|image|>\nWhat is on the table? ASSISTANT: A laptop and a cup of "
      "coffee.</s>USER: What colour is the cup? ASSISTANT: White</s>")
  # Without an image the marker is left as written (official: only image records move it).
  assert instruction.clean_conversation(IMAGE_CHAT, False)[0]["value"].endswith("<|image|>")
  # Idempotent: stored (cleaned) conversations may be cleaned again.
  assert instruction.clean_conversation(turns, True) == turns


def test_labels_cover_answers_and_eos_only(tok):
  ex = instruction.encode_conversation(TEXT_CHAT, tok, 256)
  ids, labels = ex["input_ids"], ex["labels"]
  assert not ex["truncated"] and not ex["mismatch"]
  assert ids[0] == tok.bos_id and ids.tolist() == instruction.tokenize_text(
      instruction.render(TEXT_CHAT), tok)
  supervised = labels != IGNORE_INDEX
  np.testing.assert_array_equal(labels[supervised], ids[supervised])
  # Exactly the answers' pieces (the space after "ASSISTANT:" is their word-start marker)
  # plus each closing </s>; system prompt, roles and questions are masked.
  expected = tok.pieces("7") + [2] + tok.pieces("Eleven is prime too.") + [2]
  assert labels[supervised].tolist() == expected
  assert _answers(ex, tok) == ["7", "Eleven is prime too."]


def test_image_marker_becomes_minus_200(tok):
  ex = instruction.encode_conversation(IMAGE_CHAT, tok, 256, has_image=True)
  ids = ex["input_ids"].tolist()
  prefix = instruction.tokenize_text(SYSTEM + " USER: ", tok)
  assert ids.count(IMAGE_TOKEN_ID) == 1 and ids.index(IMAGE_TOKEN_ID) == len(prefix)
  # Text after the marker is a fresh sequence whose BOS is dropped (MU:53-72).
  after = instruction.tokenize_text("\nWhat is on the table? ASSISTANT:", tok)[1:]
  assert ids[:len(prefix) + 1 + len(after)] == prefix + [IMAGE_TOKEN_ID] + after
  assert ex["labels"][len(prefix)] == IGNORE_INDEX
  assert _answers(ex, tok) == ["A laptop and a cup of coffee.", "White"]
  # A prompt starting with the marker keeps the BOS after it; adjacent markers stay adjacent.
  assert instruction.tokenize_with_images("<|image|>Name", tok)[:2] == [IMAGE_TOKEN_ID, 1]
  assert instruction.tokenize_with_images("Name<|image|><|image|>", tok)[-2:] == [-200, -200]
  # A record without image keeps the marker as text.
  text_only = instruction.encode_conversation(IMAGE_CHAT, tok, 256, has_image=False)
  assert IMAGE_TOKEN_ID not in text_only["input_ids"]


def test_official_mismatch_masks_whole_sample(tok):
  chat = [{"from": "human", "value": "Say ASSISTANT: now"}, {"from": "gpt", "value": "7"}]
  ex = instruction.encode_conversation(chat, tok, 256)
  assert ex["mismatch"] and np.all(ex["labels"] == IGNORE_INDEX)
  # Ending with a user turn: that last round is not counted, so the official length check
  # fails as well and the earlier answers lose their loss too.
  ex = instruction.encode_conversation(TEXT_CHAT[:3], tok, 256)
  assert ex["mismatch"] and np.all(ex["labels"] == IGNORE_INDEX)
  # ... unless the sample is truncated at or before the counted rounds (no check then).
  first = instruction.encode_conversation(TEXT_CHAT[:2], tok, 256)
  n = len(first["input_ids"])
  ex = instruction.encode_conversation(TEXT_CHAT[:3], tok, n)
  assert not ex["mismatch"] and ex["truncated"] and _answers(ex, tok) == ["7"]


def test_truncation(tok):
  full = instruction.encode_conversation(IMAGE_CHAT, tok, 1024, has_image=True)
  n = len(full["input_ids"])
  cut = instruction.encode_conversation(IMAGE_CHAT, tok, n - 3, has_image=True)
  assert cut["truncated"] and not cut["mismatch"] and len(cut["input_ids"]) == n - 3
  np.testing.assert_array_equal(cut["input_ids"], full["input_ids"][:n - 3])
  np.testing.assert_array_equal(cut["labels"], full["labels"][:n - 3])
  # Official truncation counts the placeholder as one id (owl2.md bug 14); counting its
  # expanded length instead cuts before an image that would not fit.
  pos = full["input_ids"].tolist().index(IMAGE_TOKEN_ID)
  official = instruction.encode_conversation(IMAGE_CHAT, tok, pos + 5, has_image=True)
  assert len(official["input_ids"]) == pos + 5
  expanded = instruction.encode_conversation(IMAGE_CHAT, tok, pos + 5, has_image=True,
                                             tokens_per_image=9)
  assert expanded["input_ids"].tolist() == full["input_ids"][:pos].tolist()


def test_collate_static_shapes(tok):
  long = instruction.encode_record({"texts": [json.dumps(IMAGE_CHAT)], "media": _jpeg(30, 20)},
                                   tok, 512, image_size=28)
  short = instruction.encode_record({"texts": [json.dumps(TEXT_CHAT).encode()], "media": b""},
                                    tok, 512, image_size=28)
  length = len(short["input_ids"]) + 4
  assert len(long["input_ids"]) > length
  batch = instruction.collate([long, short], length)
  assert {k: v.shape for k, v in batch.items()} == {
      "input_ids": (2, length), "labels": (2, length), "attention_mask": (2, length),
      "truncated": (2,), "images": (2, 28, 28, 3), "has_image": (2,)}
  assert batch["input_ids"].dtype == np.int32 and batch["labels"].dtype == np.int32
  assert batch["truncated"].tolist() == [True, False]
  n = len(short["input_ids"])
  assert np.all(batch["input_ids"][1, n:] == 0) and np.all(batch["labels"][1, n:] == -100)
  assert batch["attention_mask"][1].tolist() == [1] * n + [0] * 4
  assert batch["attention_mask"][0].all()  # the -200 placeholder is a real position
  assert batch["has_image"].tolist() == [1, 0] and not batch["images"][1].any()
  assert batch["images"][0].any()


def test_image_pixels_match_golden(shared_dir):
  case = shared_dir / "golden" / "owl2" / "preprocess_pad"
  image = np.load(case / "inputs.npz")["image_uint8"]
  expected = np.load(case / "outputs.npz")["pixel_values"][0].transpose(1, 2, 0)
  np.testing.assert_allclose(instruction.image_pixels(image, 56), expected, atol=1e-4)


def _jpeg(w, h, colour=(200, 30, 30)):
  from PIL import Image

  buf = io.BytesIO()
  Image.new("RGB", (w, h), colour).save(buf, format="JPEG")
  return buf.getvalue()


def test_build_round_trip_and_bad_counts(tok, tmp_path, capsys):
  images = tmp_path / "images"
  (images / "coco").mkdir(parents=True)
  (images / "coco" / "a.jpg").write_bytes(_jpeg(40, 30))
  (images / "b.jpg").write_bytes(_jpeg(20, 36, (10, 200, 10)))
  rows = [
      {"id": "s-1", "image": "coco/a.jpg", "conversations": IMAGE_CHAT},
      {"id": "t-2", "conversations": TEXT_CHAT},
      {"id": "s-3", "image": "b.jpg", "conversations": [
          {"from": "human", "value": "<|image|>\nDescribe the image."},
          {"from": "gpt", "value": "A green image."}]},
      {"id": "m-4", "image": "coco/missing.jpg", "conversations": IMAGE_CHAT},
      {"id": "e-5", "conversations": [{"from": "human", "value": "Hi"},
                                      {"from": "gpt", "value": "  "}]},
      {"id": "x-6", "image": "b.jpg", "conversations": [  # markers in two turns
          {"from": "human", "value": "<|image|> one"}, {"from": "gpt", "value": "a"},
          {"from": "human", "value": "<|image|> two"}, {"from": "gpt", "value": "b"}]},
  ]
  ann = tmp_path / "instruct.json"
  ann.write_text(json.dumps(rows))
  build.main(["--kind", "instruction", "--images", str(images), "--annotations", str(ann),
              "--out", str(tmp_path / "ds"), "--max_bad_fraction", "0.6"])
  log = capsys.readouterr().out
  assert "train: 3 records written, 3 skipped" in log
  assert "'missing': 1" in log and "'empty_text': 1" in log and "'bad_text': 1" in log

  src = records.RecordSource(str(tmp_path / "ds"), "train")
  recs = {src[i]["id"]: src[i] for i in range(len(src))}
  assert set(recs) == {"s-1", "t-2", "s-3"}
  assert recs["s-1"]["media"] == (images / "coco" / "a.jpg").read_bytes()
  assert recs["s-1"]["media_format"] == b"jpeg" and recs["t-2"]["media"] == b""
  stored = instruction.record_conversation(recs["s-1"])
  assert stored == instruction.clean_conversation(IMAGE_CHAT, True)  # cleaned at build time
  assert stored[0]["value"] == "<|image|>\nWhat is on the table?"

  examples = [instruction.encode_record(recs[k], tok, 128, image_size=28)
              for k in ("s-1", "t-2", "s-3")]
  assert [_answers(e, tok) for e in examples] == [
      ["A laptop and a cup of coffee.", "White"], ["7", "Eleven is prime too."],
      ["A green image."]]
  batch = instruction.collate(examples, 128)
  assert batch["has_image"].tolist() == [1, 0, 1]
  assert (batch["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist() == [1, 0, 1]
