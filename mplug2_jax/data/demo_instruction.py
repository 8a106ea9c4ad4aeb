"""Embedded instruction demo data for mPLUG-Owl2: synthetic shape images with conversations.

  python -m mplug2_jax.data.demo_instruction --out DIR [--train 256 --test 64 --size 56]

Deterministic and download-free, like `demo.py` (whose colours and shapes it reuses). Each
image shows 1-3 copies of one shape (circle / square / triangle) in one colour on a dark
background. Conversations (LLaVA-style JSON, the `instruction` importer's layout) ask about
colour, shape and count, as open questions ("Answer the question using a single word or
phrase.", the official VQA prompt suffix) and as multiple choice (MMBench-style "A. ..."
options, answered with the letter); one record in four is a text-only conversation (word
arithmetic and opposites), so batches mix text-only and image samples. Written:

  DIR/raw/images/{split}_{i:05d}.jpg
  DIR/raw/instruction_{split}.json    Owl2 / LLaVA instruction list {id, image?, conversations}
  DIR/raw/image_text_{split}.json     the same images with captions (stage-1 pairs)
  DIR/raw/questions_{split}.jsonl     one question per line {question_id, image ("" for
                                      text), question, answer, kind: open | choice | text,
                                      format: vqa | choice (evaluate/owl2_bench.py), options?}
  DIR/tokenizer.model                 a LLaMA-layout SentencePiece model of the demo text
  DIR/{instruction,image_text}/       built datasets (`build.build`)
"""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

import numpy as np
from absl import flags

from mplug2_jax import cli
from mplug2_jax.data import demo

COLOURS = tuple(demo.COLOURS)
SHAPES = demo.SHAPES
COUNT_WORDS = ("one", "two", "three")
OPEN_SUFFIX = "Answer the question using a single word or phrase."
CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCD"
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
OPPOSITES = {"hot": "cold", "up": "down", "big": "small", "left": "right", "day": "night",
             "fast": "slow"}


def render_scene(rng: np.random.Generator, colour: str, shape: str, count: int,
                 size: int) -> np.ndarray:
  """uint8 (size, size, 3): `count` non-overlapping copies of the shape, one per cell of a
  random row of a 3 x 3 grid (so counts up to three never touch)."""
  background = rng.integers(10, 60, size=3)
  img = np.broadcast_to(background, (size, size, 3)).astype(np.uint8).copy()
  cell = size / 3
  r = cell * rng.uniform(0.32, 0.42)
  row = int(rng.integers(3))
  cols = np.sort(rng.choice(3, count, replace=False))
  for col in cols:
    cx = (col + 0.5) * cell + rng.uniform(-0.05, 0.05) * cell
    cy = (row + 0.5) * cell + rng.uniform(-0.05, 0.05) * cell
    img[demo._shape_mask(shape, size, cx, cy, r)] = demo.COLOURS[colour]
  return img


def _choice(rng: np.random.Generator, answer: str, pool: Sequence[str]) -> tuple[str, str, list]:
  """(options text, answer letter, options): the answer among up to 3 distractors."""
  others = [p for p in pool if p != answer]
  options = [answer] + list(rng.choice(others, min(3, len(others)), replace=False))
  rng.shuffle(options)
  text = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
  return text, LETTERS[options.index(answer)], options


def image_questions(rng: np.random.Generator, colour: str, shape: str,
                    count: int) -> list[dict]:
  """Every question about one image: open and multiple choice, colour / shape / count. No
  wording gives an answer away ("How many circle are there?" would tell the count by the
  noun's number and the shape by the noun)."""
  facts = [("What colour is the shape?", colour, COLOURS),
           ("What shape is shown?", shape, SHAPES),
           ("How many shapes are there?", COUNT_WORDS[count - 1], COUNT_WORDS)]
  out = []
  for question, answer, pool in facts:
    out.append(dict(kind="open", format="vqa", ask=question,
                    question=f"{question}\n{OPEN_SUFFIX}", answer=answer))
    text, letter, options = _choice(rng, answer, pool)
    out.append(dict(kind="choice", format="choice", ask=question,
                    question=f"{question}\n{text}\n{CHOICE_SUFFIX}", answer=letter,
                    options=options))
  return out


def text_question(rng: np.random.Generator) -> dict:
  """A text-only question: word arithmetic or an opposite."""
  if rng.random() < 0.5:
    a, b = (int(x) for x in rng.integers(0, 4, 2))
    ask = f"What is {NUMBERS[a]} plus {NUMBERS[b]}?"
    return dict(kind="text", format="vqa", ask=ask, question=f"{ask}\n{OPEN_SUFFIX}",
                answer=NUMBERS[a + b])
  word = list(OPPOSITES)[int(rng.integers(len(OPPOSITES)))]
  ask = f"What is the opposite of {word}?"
  return dict(kind="text", format="vqa", ask=ask, question=f"{ask}\n{OPEN_SUFFIX}",
              answer=OPPOSITES[word])


def _held_out(q: dict, question_id: int, image: str = "") -> dict:
  """A question file line: the bare question (the evaluator adds the format's suffix)."""
  out = dict(question_id=question_id, kind=q["kind"], format=q["format"], question=q["ask"],
             answer=q["answer"], image=image)
  if "options" in q:
    out["options"] = q["options"]
  return out


def caption(colour: str, shape: str, count: int) -> str:
  noun = shape + ("s" if count > 1 else "")
  return f"{COUNT_WORDS[count - 1]} {colour} {noun} on a dark background"


def write_raw(out: str, num_train: int = 256, num_test: int = 64, size: int = 56,
              seed: int = 0) -> dict[str, dict[str, str]]:
  """Writes images and annotation files; returns {kind: {split: path}}."""
  raw = os.path.join(out, "raw")
  os.makedirs(os.path.join(raw, "images"), exist_ok=True)
  files: dict[str, dict[str, str]] = {"instruction": {}, "image_text": {}, "questions": {}}
  for split, n, split_seed in (("train", num_train, seed), ("test", num_test, seed + 1)):
    rng = np.random.default_rng([split_seed, 4321])
    instructions, pairs, questions = [], [], []
    for i in range(n):
      name = f"{split}_{i:05d}"
      if i % 4 == 3:  # text-only conversation
        turns = [text_question(rng) for _ in range(2)]
        conv = []
        for t in turns:
          conv += [{"from": "human", "value": t["question"]}, {"from": "gpt", "value": t["answer"]}]
        instructions.append({"id": name, "conversations": conv})
        questions.append(_held_out(turns[0], len(questions)))
        continue
      colour = COLOURS[int(rng.integers(len(COLOURS)))]
      shape = SHAPES[int(rng.integers(len(SHAPES)))]
      count = int(rng.integers(1, 4))
      image = name + ".jpg"
      with open(os.path.join(raw, "images", image), "wb") as f:
        f.write(demo.encode_jpeg(render_scene(rng, colour, shape, count, size)))
      asked = image_questions(rng, colour, shape, count)
      order = rng.permutation(len(asked))[:3]
      conv = []
      for k, j in enumerate(order):
        q = asked[j]["question"]
        conv += [{"from": "human", "value": ("<|image|>" if k == 0 else "") + q},
                 {"from": "gpt", "value": asked[j]["answer"]}]
      instructions.append({"id": name, "image": image, "conversations": conv})
      pairs.append({"image": image, "image_id": i, "caption": caption(colour, shape, count)})
      q = asked[int(rng.integers(len(asked)))]
      questions.append(_held_out(q, len(questions), image))
    for kind, rows in (("instruction", instructions), ("image_text", pairs)):
      path = os.path.join(raw, f"{kind}_{split}.json")
      with open(path, "w", encoding="utf-8") as f:
        json.dump(rows, f)
      files[kind][split] = path
    path = os.path.join(raw, f"questions_{split}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(q) + "\n" for q in questions)
    files["questions"][split] = path
  return files


def train_tokenizer(out: str, files: dict[str, dict[str, str]], vocab_size: int = 600) -> str:
  """A LLaMA-layout SentencePiece model of every demo text plus the Vicuna-v1 template."""
  from mplug2_jax.data import instruction, spm

  # The template lines repeat so that BPE merges them into few pieces (short sequences).
  lines = [instruction.VICUNA_V1.system + " USER: ASSISTANT:"] * 200
  for path in files["instruction"].values():
    with open(path, encoding="utf-8") as f:
      for rec in json.load(f):
        lines += [t["value"].replace("<|image|>", "") for t in rec["conversations"]]
  for path in files["image_text"].values():
    with open(path, encoding="utf-8") as f:
      lines += [r["caption"] for r in json.load(f)]
  corpus = os.path.join(out, "raw", "tokenizer_corpus.txt")
  with open(corpus, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return spm.train([corpus], os.path.join(out, "tokenizer"), vocab_size, model_type="bpe",
                   layout="llama")


def make_demo(out: str, num_train: int = 256, num_test: int = 64, size: int = 56,
              seed: int = 0, log=print) -> dict[str, str]:
  """Writes the raw data, the tokenizer and both built datasets; returns
  {"instruction", "image_text": dataset dir, "tokenizer": model file, "questions_test": ...}."""
  from mplug2_jax.data import build

  start = time.time()
  files = write_raw(out, num_train, num_test, size, seed)
  root = os.path.join(out, "raw", "images")
  built = {kind: build.build(kind, os.path.join(out, kind),
                             {s: [p] for s, p in files[kind].items()}, root,
                             max_bad_fraction=0.0, log=lambda *_: None)
           for kind in ("instruction", "image_text")}
  built["tokenizer"] = train_tokenizer(out, files)
  built.update({f"questions_{s}": p for s, p in files["questions"].items()})
  log(f"instruction demo data in {out} ({num_train} train / {num_test} test) in "
      f"{time.time() - start:.1f}s")
  return built


def main(argv: Sequence[str] | None = None) -> None:
  fv = flags.FlagValues()
  flags.DEFINE_string("out", None, "Output folder.", flag_values=fv)
  flags.DEFINE_integer("train", 256, "Training records.", flag_values=fv)
  flags.DEFINE_integer("test", 64, "Held-out records.", flag_values=fv)
  flags.DEFINE_integer("size", 56, "Image side in pixels (the tiny Owl2 model's 56).",
                       flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Random seed.", flag_values=fv)
  flags.mark_flag_as_required("out", flag_values=fv)
  cli.parse(fv, argv, __doc__)
  make_demo(fv.out, fv.train, fv.test, fv.size, fv.seed)


if __name__ == "__main__":
  main()
