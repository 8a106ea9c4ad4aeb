"""mPLUG-Owl2 benchmark formats: prompts, official file layouts, answer extraction, scores.

Formats (`FORMATS`), each scored from {question_id: generated text} and the gold file:

  vqa      open answers, VQA accuracy (min(1, matches / 3) over the leave-one-out subsets
           of the human answers, the standard normalisation: `metrics.vqa_score`); VQAv2,
           TextVQA, OK-VQA, VizWiz. GQA has one answer: exact match after normalisation.
  choice   multiple choice with lettered options (MMBench, ScienceQA-IMG): the letter is
           extracted from the generated text (`extract_letter`), accuracy in %.
  yesno    MME: per sub-task, acc = % of questions answered right, acc+ = % of images whose
           questions (two per image) are all right; sub-task score = acc + acc+; the
           perception score is the sum over its sub-tasks.
  text_mc  text-only multiple choice (MMLU): letter extraction, accuracy overall (micro)
           and the mean over subjects (macro).
  caption  COCO / NoCaps / Flickr30K captions: `metrics.caption_metrics` (pycocoevalcap).

Prompts: the official benchmark prompt of owl2.md 8 for VQA ("USER: <|image|>{q} Answer
the question using a single word or phrase. ASSISTANT: ", `evaluate/evaluate_vqa.py:162`);
the others follow the same mplug_owl2 template with the LLaVA-1.5 instruction suffixes
(multiple choice "Answer with the option's letter from the given choices directly.",
captioning "Provide a one-sentence caption for the provided image."): our choice, not
checked against the official evaluation scripts. Greedy decoding with the official
max_new_tokens (10 for VQA / MME / MMBench, 60 for captions).

Paper numbers (`BENCHMARKS[...]["paper"]`) are from memory of arXiv 2311.04257 tables and
are **unverified**.
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np

from mplug2_jax.evaluate import metrics

FORMATS = ("vqa", "choice", "yesno", "text_mc", "caption")
TEMPLATE = "USER: {image}{text} ASSISTANT: "
IMAGE = "<|image|>"
SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
CAPTION = "Provide a one-sentence caption for the provided image."

# One row per paper table entry: format, metric key, greedy max_new_tokens, paper value
# (unverified, from memory), and the official gold layout read by `read_gold`.
BENCHMARKS: dict[str, dict[str, Any]] = {
    "vqav2": dict(format="vqa", metric="accuracy", max_new_tokens=10, paper=79.4,
                  layout="vqa_v2"),
    "okvqa": dict(format="vqa", metric="accuracy", max_new_tokens=10, paper=57.7,
                  layout="vqa_v2"),
    "textvqa": dict(format="vqa", metric="accuracy", max_new_tokens=10, paper=58.2,
                    layout="textvqa"),
    "vizwiz": dict(format="vqa", metric="accuracy", max_new_tokens=10, paper=54.5,
                   layout="vizwiz"),
    "gqa": dict(format="vqa", metric="exact_match", max_new_tokens=10, paper=56.1,
                layout="gqa"),
    "scienceqa_img": dict(format="choice", metric="accuracy", max_new_tokens=10, paper=68.7,
                          layout="jsonl_choice"),
    "mmbench": dict(format="choice", metric="accuracy", max_new_tokens=10, paper=64.5,
                    layout="mmbench_tsv"),
    "mme": dict(format="yesno", metric="perception", max_new_tokens=10, paper=1450.2,
                layout="mme"),
    "mmlu": dict(format="text_mc", metric="accuracy", max_new_tokens=10, paper=53.4,
                 layout="mmlu_csv"),
    "coco_caption": dict(format="caption", metric="CIDEr", max_new_tokens=60, paper=137.3,
                         layout="coco_caption"),
    "flickr30k": dict(format="caption", metric="CIDEr", max_new_tokens=60, paper=85.1,
                      layout="coco_caption"),
    # The embedded demo questions (data/demo_instruction.py): no paper number.
    "demo": dict(format="vqa", metric="choice/accuracy", max_new_tokens=5, paper=None,
                 layout="demo_jsonl"),
}

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")


# --------------------------------------------------------------------------------------
# Prompts.
# --------------------------------------------------------------------------------------


def options_text(options: Sequence[str]) -> str:
  return "\n".join(f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(options))


STYLES = ("official", "vicuna_v1")


def prompt(fmt: str, question: str = "", options: Sequence[str] = (),
           has_image: bool = True, style: str = "official") -> str:
  """The prompt of one example. "official": the mplug_owl2 inference template (no system
  prompt, the marker glued to the question, owl2.md 6); "vicuna_v1": the training template
  (system prompt, the marker on its own line, no space after "ASSISTANT:"), for models
  trained only with it (the demo; official bug 13 is the mismatch between the two)."""
  if fmt not in FORMATS:
    raise ValueError(f"benchmark format {fmt!r} not in {FORMATS}")
  if style not in STYLES:
    raise ValueError(f"prompt style {style!r} not in {STYLES}")
  if fmt == "caption":
    text = CAPTION
  elif fmt in ("choice", "text_mc"):
    text = f"{question}\n{options_text(options)}\n{LETTER}"
  elif fmt == "yesno":
    text = question
  else:
    text = f"{question} {SHORT}"
  if style == "vicuna_v1":
    from mplug2_jax.data import instruction

    image = IMAGE + "\n" if has_image else ""
    text = text.replace(f" {SHORT}", f"\n{SHORT}")
    # No trailing space: in training the space before an answer is the word-start marker
    # of the answer's first piece, never a lone "▁" token.
    return f"{instruction.VICUNA_V1.system} USER: {image}{text} ASSISTANT:"
  return TEMPLATE.format(image=IMAGE if has_image else "", text=text)


# --------------------------------------------------------------------------------------
# Answer extraction.
# --------------------------------------------------------------------------------------

_ANY_LETTER = re.compile(r"(?:^|[\s(])([A-Z])(?=[\).:,]|\s|$)")


def extract_letter(text: str, options: Sequence[str]) -> str:
  """The option letter a generated answer names, or "" if none or ambiguous:
  1. the valid letter standing alone ("B", "B.", "(B) ...", "The answer is C."), if exactly
     one valid letter does;
  2. else, with no standalone letter, the only option whose text appears in the answer
     (case-insensitive)."""
  valid = {chr(ord("A") + i) for i in range(len(options))}
  found = {x for x in _ANY_LETTER.findall(text) if x in valid}
  if len(found) == 1:
    return found.pop()
  if found:
    return ""
  lower = text.lower()
  named = [chr(ord("A") + i) for i, o in enumerate(options) if o and o.lower() in lower]
  return named[0] if len(named) == 1 else ""


def yes_no(text: str) -> str:
  """"yes" / "no" from the start of an answer (MME convention), else "other"."""
  words = re.findall(r"[a-z]+", text.lower())
  if words and words[0] in ("yes", "no"):
    return words[0]
  return "other"


# --------------------------------------------------------------------------------------
# Scores.
# --------------------------------------------------------------------------------------


def score_vqa(preds: Mapping[Any, str], golds: Mapping[Any, Sequence[str]]) -> dict:
  """VQA accuracy (%) over the gold questions (a missing prediction scores 0)."""
  scores = [metrics.vqa_score(preds.get(q, ""), g) for q, g in golds.items()]
  return {"accuracy": 100.0 * float(np.mean(scores)), "num": len(scores)}


def score_exact(preds: Mapping[Any, str], golds: Mapping[Any, str]) -> dict:
  """Exact match (%) after the standard answer normalisation (GQA)."""
  hits = [metrics.normalize_vqa_answer(preds.get(q, "")) == metrics.normalize_vqa_answer(g)
          for q, g in golds.items()]
  return {"exact_match": 100.0 * float(np.mean(hits)), "num": len(hits)}


def score_choice(preds: Mapping[Any, str], golds: Mapping[Any, dict]) -> dict:
  """Accuracy (%) of extracted letters; golds {qid: {answer: letter, options: [...],
  subject?: str}}; with subjects also the macro mean over subjects."""
  hits, by_subject = [], defaultdict(list)
  for q, g in golds.items():
    hit = extract_letter(preds.get(q, ""), g["options"]) == g["answer"]
    hits.append(hit)
    if g.get("subject"):
      by_subject[g["subject"]].append(hit)
  out = {"accuracy": 100.0 * float(np.mean(hits)), "num": len(hits)}
  if by_subject:
    out["accuracy_macro"] = 100.0 * float(np.mean([np.mean(v) for v in by_subject.values()]))
  return out


def score_mme(preds: Mapping[Any, str], golds: Mapping[Any, dict]) -> dict:
  """MME scores; golds {qid: {answer: "Yes"|"No", task, image}}."""
  per_task: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
  for q, g in golds.items():
    right = yes_no(preds.get(q, "")) == g["answer"].strip().lower()
    per_task[g["task"]][g["image"]].append(right)
  out: dict[str, float] = {}
  for task, images in per_task.items():
    answers = [r for rs in images.values() for r in rs]
    acc = 100.0 * float(np.mean(answers))
    acc_plus = 100.0 * float(np.mean([all(rs) for rs in images.values()]))
    out[f"{task}/acc"], out[f"{task}/acc_plus"] = acc, acc_plus
    out[task] = acc + acc_plus
  out["perception"] = float(sum(out[t] for t in MME_PERCEPTION if t in out))
  out["cognition"] = float(sum(out[t] for t in per_task if t not in MME_PERCEPTION))
  return out


def score(fmt: str, preds: Mapping[Any, str], golds: Mapping[Any, Any],
          metric: str = "") -> dict:
  if fmt == "vqa":
    return score_exact(preds, golds) if metric == "exact_match" else score_vqa(preds, golds)
  if fmt in ("choice", "text_mc"):
    return score_choice(preds, golds)
  if fmt == "yesno":
    return score_mme(preds, golds)
  if fmt == "caption":
    return metrics.caption_metrics({q: preds.get(q, "") for q in golds}, golds)
  raise ValueError(f"benchmark format {fmt!r} not in {FORMATS}")


# --------------------------------------------------------------------------------------
# Official file layouts -> (examples, golds).
# An example: {question_id, question, image (file name or ""), options}.
# --------------------------------------------------------------------------------------


def read_gold(layout: str, paths: Sequence[str]) -> tuple[list[dict], dict]:
  """Examples and golds of an official layout:

    vqa_v2        questions JSON {"questions": [{question_id, image_id, question}]} and
                  annotations JSON {"annotations": [{question_id, answers: [{answer}]}]};
                  image = COCO_val2014_{image_id:012d}.jpg
    textvqa       TextVQA JSON {"data": [{question_id, image_id, question, answers}]}
    vizwiz        VizWiz JSON list [{image, question, answers: [{answer}]}] (qid = index)
    gqa           GQA JSON {qid: {imageId, question, answer}}
    jsonl_choice  JSONL {question_id, image, question, options: [...], answer: letter}
    mmbench_tsv   MMBench TSV: index, question, A, B, C, D, answer, image (base64: kept
                  as the string "b64:<index>"), category
    mme           MME txt files "<task>.txt" of lines "image<TAB>question<TAB>Yes|No"
    mmlu_csv      MMLU CSVs "<subject>_test.csv": question, A, B, C, D, answer (no header)
    coco_caption  COCO captions JSON {"images": [{id, file_name}], "annotations":
                  [{image_id, caption}]}
  """
  if layout == "vqa_v2":
    qs = json.load(open(paths[0], encoding="utf-8"))["questions"]
    ann = {a["question_id"]: [x["answer"] for x in a["answers"]]
           for a in json.load(open(paths[1], encoding="utf-8"))["annotations"]}
    examples = [dict(question_id=q["question_id"], question=q["question"],
                     image=f"COCO_val2014_{int(q['image_id']):012d}.jpg") for q in qs]
    return examples, {q["question_id"]: ann[q["question_id"]] for q in qs}
  if layout == "textvqa":
    data = json.load(open(paths[0], encoding="utf-8"))["data"]
    return ([dict(question_id=d["question_id"], question=d["question"],
                  image=f"{d['image_id']}.jpg") for d in data],
            {d["question_id"]: list(d["answers"]) for d in data})
  if layout == "vizwiz":
    data = json.load(open(paths[0], encoding="utf-8"))
    return ([dict(question_id=i, question=d["question"], image=d["image"])
             for i, d in enumerate(data)],
            {i: [a["answer"] for a in d["answers"]] for i, d in enumerate(data)})
  if layout == "gqa":
    data = json.load(open(paths[0], encoding="utf-8"))
    return ([dict(question_id=k, question=v["question"], image=f"{v['imageId']}.jpg")
             for k, v in data.items()], {k: v["answer"] for k, v in data.items()})
  if layout == "jsonl_choice":
    rows = [json.loads(line) for line in open(paths[0], encoding="utf-8") if line.strip()]
    return ([dict(question_id=r["question_id"], question=r["question"],
                  image=r.get("image", ""), options=r["options"]) for r in rows],
            {r["question_id"]: dict(answer=r["answer"], options=r["options"],
                                    subject=r.get("subject", "")) for r in rows})
  if layout == "mmbench_tsv":
    with open(paths[0], encoding="utf-8", newline="") as f:
      rows = list(csv.DictReader(f, delimiter="\t"))
    examples, golds = [], {}
    for r in rows:
      options = [r[k] for k in "ABCD" if r.get(k) not in (None, "", "nan")]
      qid = int(r["index"])
      examples.append(dict(question_id=qid, question=r["question"], image=f"b64:{qid}",
                           options=options))
      golds[qid] = dict(answer=r["answer"].strip(), options=options,
                        subject=r.get("category", ""))
    return examples, golds
  if layout == "mme":
    examples, golds = [], {}
    for path in paths:
      task = re.sub(r"\.txt$", "", path.replace("\\", "/").rsplit("/", 1)[-1])
      for line in open(path, encoding="utf-8"):
        if not line.strip():
          continue
        image, question, answer = line.rstrip("\n").split("\t")
        qid = f"{task}/{len(golds)}"
        examples.append(dict(question_id=qid, question=question, image=image))
        golds[qid] = dict(answer=answer, task=task, image=image)
    return examples, golds
  if layout == "mmlu_csv":
    examples, golds = [], {}
    for path in paths:
      subject = re.sub(r"_test\.csv$", "", path.replace("\\", "/").rsplit("/", 1)[-1])
      with open(path, encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.reader(f)):
          qid = f"{subject}/{i}"
          examples.append(dict(question_id=qid, question=row[0], image="", options=row[1:5]))
          golds[qid] = dict(answer=row[5].strip(), options=row[1:5], subject=subject)
    return examples, golds
  if layout == "coco_caption":
    data = json.load(open(paths[0], encoding="utf-8"))
    refs: dict[Any, list[str]] = defaultdict(list)
    for a in data["annotations"]:
      refs[a["image_id"]].append(a["caption"])
    return ([dict(question_id=im["id"], question="", image=im["file_name"])
             for im in data["images"]], dict(refs))
  if layout == "demo_jsonl":  # data/demo_instruction.py questions files
    rows = [json.loads(line) for line in open(paths[0], encoding="utf-8") if line.strip()]
    return rows, {r["question_id"]: r for r in rows}
  raise ValueError(f"benchmark layout {layout!r} unknown")


def score_demo(preds: Mapping[Any, str], golds: Mapping[Any, dict]) -> dict:
  """The demo questions: accuracy (%) per kind (open: exact match after normalisation,
  choice: extracted letter, text: exact match) and the chance level of each kind (uniform
  guessing among the answers of that question type / the options)."""
  hits, chance = defaultdict(list), defaultdict(list)
  from mplug2_jax.data import demo_instruction as demo

  pools = {"colour": len(demo.COLOURS), "shape": len(demo.SHAPES),
           "count": len(demo.COUNT_WORDS)}
  for q, g in golds.items():
    pred = preds.get(q, "")
    if g["format"] == "choice":
      hits[g["kind"]].append(extract_letter(pred, g["options"]) == g["answer"])
      chance[g["kind"]].append(1.0 / len(g["options"]))
    else:
      hits[g["kind"]].append(metrics.normalize_vqa_answer(pred)
                             == metrics.normalize_vqa_answer(g["answer"]))
      ask = g["question"].lower()
      pool = (pools["colour"] if "colour" in ask else pools["count"] if "how many" in ask
              else pools["shape"] if "shape" in ask else 0)
      chance[g["kind"]].append(1.0 / pool if pool else 0.0)
  out = {}
  for kind in sorted(hits):
    out[f"{kind}/accuracy"] = 100.0 * float(np.mean(hits[kind]))
    out[f"{kind}/chance"] = 100.0 * float(np.mean(chance[kind]))
    out[f"{kind}/num"] = len(hits[kind])
  return out


# --------------------------------------------------------------------------------------
# Batched greedy generation over the examples (every example exactly once).
# --------------------------------------------------------------------------------------


def _bucket(n: int, step: int = 32) -> int:
  return -(-n // step) * step


def load_pixels(path: str, size: int) -> np.ndarray:
  """The official benchmark preprocessing: stretch to a square, then the CLIP processor
  (owl2.md 7, `evaluate/evaluate_vqa.py:95-98`)."""
  from PIL import Image

  from mplug2_jax.data import instruction

  with Image.open(path) as image:
    pixels = np.asarray(image.convert("RGB"))
  return instruction.image_pixels(pixels, size, aspect="resize")


def make_batch(prompts: Sequence[str], images: Sequence[np.ndarray | None], tokenizer,
               model_cfg, padding: str = "left", length: int = 0) -> dict[str, np.ndarray]:
  """Prompts (with `<|image|>` markers) and one image or None each -> a generation batch,
  padded on the left (official benchmarks) or the right; the model gives every real token
  the position it has alone either way (owl2.md bugs 1-3 done right)."""
  from mplug2_jax.data import instruction

  ids = [instruction.tokenize_with_images(p, tokenizer) for p in prompts]
  rows = len(ids)
  length = length or _bucket(max(len(x) for x in ids))
  batch = {"input_ids": np.full((rows, length), model_cfg.llm.pad_token_id, np.int32),
           "attention_mask": np.zeros((rows, length), np.int32)}
  for r, x in enumerate(ids):
    where = slice(length - len(x), length) if padding == "left" else slice(0, len(x))
    batch["input_ids"][r, where] = x
    batch["attention_mask"][r, where] = 1
  size = int(model_cfg.image_size)
  batch["images"] = np.zeros((rows, 1, size, size, 3), np.float32)
  batch["image_mask"] = np.zeros((rows, 1), np.int32)
  for r, image in enumerate(images):
    if image is not None:
      batch["images"][r, 0] = image
      batch["image_mask"][r, 0] = 1
  return batch


def decode(tokens: Sequence[int], tokenizer, eos_id: int) -> str:
  tokens = [int(t) for t in tokens]
  if eos_id in tokens:
    tokens = tokens[:tokens.index(eos_id)]
  return tokenizer.decode([t for t in tokens if 0 <= t < tokenizer.vocab_size]).strip()


def predict(model_cfg, params, examples: Sequence[dict], *, fmt: str, tokenizer,
            image_root: str = "", max_new_tokens: int = 10, batch_size: int = 8,
            padding: str = "left", length: int = 0, style: str = "official",
            generate=None, log=lambda *_: None) -> dict[Any, str]:
  """{question_id: generated answer} of every example, greedy (owl2.md 8).

  Each process takes examples[process_index::process_count], padded to the same number of
  full batches with copies flagged invalid; the valid rows of every process are gathered,
  so each example is answered exactly once. `length` fixes the prompt length (0: bucketed
  per batch). `generate` (params, batch) -> Generated defaults to the family's greedy
  `predict.generate_fn`.
  """
  import jax
  import ml_collections

  from mplug2_jax.evaluate import common
  from mplug2_jax.models import registry

  family = registry.of(model_cfg)
  if generate is None:
    settings = family.predict.default_settings()
    settings.update(max_new_tokens=int(max_new_tokens), temperature=0.0)
    run = family.predict.generate_fn(model_cfg, ml_collections.ConfigDict(settings))
    generate = lambda p, b: run(p, b)
  index, count = jax.process_index(), jax.process_count()
  mine = list(examples)[index::count]
  per_process = -(-len(examples) // count)
  total = -(-per_process // batch_size) * batch_size
  rows: list[dict] = []
  for start in range(0, total, batch_size):
    chunk = [(mine[i], True) if i < len(mine) else (examples[0], False)
             for i in range(start, start + batch_size)]
    prompts, images = [], []
    for ex, _ in chunk:
      has_image = bool(ex.get("image"))
      prompts.append(prompt(ex.get("format", fmt), ex.get("question", ""),
                            ex.get("options", ()), has_image, style))
      images.append(load_pixels(f"{image_root}/{ex['image']}", int(model_cfg.image_size))
                    if has_image else None)
    batch = make_batch(prompts, images, tokenizer, model_cfg, padding, length)
    out = generate(params, batch)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for r, (ex, valid) in enumerate(chunk):
      if valid:
        rows.append({"question_id": ex["question_id"],
                     "answer": decode(tokens[r, :lengths[r]], tokenizer,
                                      int(model_cfg.llm.eos_token_id))})
    log(f"{min(start + batch_size, len(mine))}/{len(mine)} examples")
  rows = common.allgather_rows(rows)
  answers = {r["question_id"]: r["answer"] for r in rows}
  if len(answers) != len(rows) or len(rows) != len(examples):
    raise ValueError(f"{len(rows)} answers for {len(examples)} examples "
                     f"({len(answers)} distinct question ids)")
  return answers


def main(argv: Sequence[str] | None = None) -> None:
  """`python -m mplug2_jax.evaluate.owl2_bench --config configs/owl2_eval.py:bench=...
  --checkpoint DIR`: one row, printed beside the paper's number; metrics.json written
  to --workdir (default: the checkpoint's eval/<bench>)."""
  import time

  from absl import flags
  from etils import epath

  import importlib.util

  from mplug2_jax import cli, param_store
  from mplug2_jax.data import spm

  fv = flags.FlagValues()
  flags.DEFINE_string("config", None, "configs/owl2_eval.py:bench=...", flag_values=fv)
  flags.DEFINE_string("checkpoint", None, "parameters directory", flag_values=fv)
  flags.DEFINE_string("workdir", "", "output directory", flag_values=fv)
  flags.mark_flags_as_required(["config", "checkpoint"], flag_values=fv)
  cli.parse(fv, argv, main.__doc__)
  path, _, arg = fv.config.partition(":")
  spec = importlib.util.spec_from_file_location("_owl2_eval_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg or None)
  if not c.gold:
    raise ValueError("configs/owl2_eval.py: gold= (the official file(s)) is required")
  model_cfg = param_store.load_model_config(fv.checkpoint)
  params = param_store.load_params(fv.checkpoint)
  tokenizer = spm.SentencePieceTokenizer(c.vocab_file)
  examples, golds = read_gold(c.layout, list(c.gold))
  start = time.time()
  preds = predict(model_cfg, params, examples, fmt=c.format, tokenizer=tokenizer,
                  image_root=c.images, max_new_tokens=c.max_new_tokens,
                  batch_size=c.batch_size, padding=c.padding, style=c.style, log=print)
  result = (score_demo(preds, golds) if c.layout == "demo_jsonl"
            else score(c.format, preds, golds, c.metric))
  for key, paper in c.paper.items():
    if paper is None:
      continue
    print(f"{c.bench} {key}: ours {result.get(key, float('nan')):.2f}, paper {paper} "
          f"(unverified)")
  out = epath.Path(fv.workdir or epath.Path(fv.checkpoint) / "eval" / c.bench)
  out.mkdir(parents=True, exist_ok=True)
  (out / "metrics.json").write_text(json.dumps(
      {"metrics": result, "paper": c.paper.to_dict(), "seconds": time.time() - start},
      indent=1, default=str))
  (out / "predictions.json").write_text(json.dumps(
      [{"question_id": q, "answer": a} for q, a in preds.items()], default=str))


if __name__ == "__main__":
  main()
