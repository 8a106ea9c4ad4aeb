r"""Chat with mPLUG-Owl2: an interactive multi-turn conversation, or answers for a JSONL.

  # interactive (type a question per line; an empty line or EOF ends the conversation)
  python -m mplug2_jax.chat --checkpoint /ckpt/owl2_7b --tokenizer tokenizer.model \
      --image photo.jpg [--image second.jpg]
  # one question, answer printed
  python -m mplug2_jax.chat --checkpoint /ckpt/owl2_7b --image photo.jpg \
      --prompt "Describe the image."
  # batch mode: one JSON object per line {"id": .., "prompt": "..", "image": "a.jpg" |
  # ["a.jpg", "b.jpg"] | null}; writes {"id", "prompt", "answer"} lines
  python -m mplug2_jax.chat --checkpoint /ckpt/owl2_7b --batch questions.jsonl \
      --output answers.jsonl --config configs/owl2_chat.py:mode=vqa

`--checkpoint` is a parameters directory (`python -m mplug2_jax.convert import-official`
output or a finished run's workdir); `--tokenizer` the LLaMA SentencePiece model (default:
`tokenizer.model` in the checkpoint directory). Decoding settings: `configs/owl2_chat.py`
(default: the official CLI, sampling at temperature 0.2, up to 512 tokens).

The prompt is the official inference template `mplug_owl2` (owl2.md section 6): no system
prompt, "USER: <|image|>question ASSISTANT:"; the images' markers go in front of the first
question; every later turn is appended to the history ("... ASSISTANT: answer</s>USER:
next ASSISTANT:"), so the model sees the whole conversation each turn. A turn ends at
`</s>` (or a stop string); the answer is the decoded text before it. Batch mode pads the
prompts of a batch together; the answers are those each prompt gets alone.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Sequence

import numpy as np
from absl import flags
from ml_collections import config_flags

from mplug2_jax import cli



def flag_values() -> flags.FlagValues:
  """This CLI's own flags (callable in-process next to other CLIs)."""
  fv = flags.FlagValues()
  flags.DEFINE_string("checkpoint", None, "Parameters directory (model_config.json).",
                      flag_values=fv)
  flags.DEFINE_string("tokenizer", None, "LLaMA SentencePiece tokenizer.model (default: "
                      "CHECKPOINT/tokenizer.model).", flag_values=fv)
  flags.DEFINE_multi_string("image", [], "Image file(s) of the conversation.", flag_values=fv)
  flags.DEFINE_string("prompt", None, "One question: print the answer and exit.",
                      flag_values=fv)
  flags.DEFINE_string("batch", None, "JSONL of prompts (batch mode).", flag_values=fv)
  flags.DEFINE_string("output", None, "Batch mode: JSONL of answers to write.", flag_values=fv)
  config_flags.DEFINE_config_file("config", None, "Decoding settings (configs/owl2_chat.py); "
                                  "default mode=cli.", flag_values=fv)
  return fv


class UsageError(ValueError):
  """A bad command line or input file: reported in one line, exit status 2."""


def default_settings():
  """configs/owl2_chat.py:mode=cli without reading the file (the CLI's defaults)."""
  import ml_collections

  from mplug2_jax.models import registry

  c = ml_collections.ConfigDict()
  c.generation = registry.get("owl2").predict.default_settings()
  c.image_aspect = "pad"
  c.prompt_suffix = ""
  c.stop_strings = ("</s>",)
  c.batch_size = 8
  c.seed = 0
  return c


def bucket(n: int, step: int = 32) -> int:
  """Prompt lengths are padded to a multiple of `step`: few compiled shapes."""
  return max(step, -(-n // step) * step)


class Chat:
  """A loaded model with its tokenizer and decoding settings."""

  def __init__(self, checkpoint: str, tokenizer_file: str | None, settings):
    import jax

    from mplug2_jax import param_store
    from mplug2_jax.data import instruction, spm
    from mplug2_jax.models import registry

    self.model_cfg = param_store.load_model_config(checkpoint)
    self.family = registry.of(self.model_cfg)
    if self.family.NAME != "owl2":
      raise UsageError(f"{checkpoint} holds a {self.model_cfg.name} model; chat needs "
                           "mPLUG-Owl2")
    tokenizer_file = tokenizer_file or str(pathlib.Path(checkpoint) / "tokenizer.model")
    if not pathlib.Path(tokenizer_file).exists():
      raise UsageError(f"tokenizer {tokenizer_file} does not exist (--tokenizer)")
    self.tokenizer = spm.SentencePieceTokenizer(tokenizer_file)
    if self.tokenizer.vocab_size > self.model_cfg.llm.vocab_size:
      raise UsageError(f"tokenizer {tokenizer_file} has {self.tokenizer.vocab_size} pieces, "
                           f"the model {self.model_cfg.llm.vocab_size}")
    self.instruction = instruction
    self.settings = settings
    self.params = jax.device_put(param_store.load_params(checkpoint))
    self.generate = self.family.predict.generate_fn(self.model_cfg, settings.generation)
    self.calls = 0

  def load_image(self, path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
      pixels = np.asarray(image.convert("RGB"))
    return self.instruction.image_pixels(pixels, self.model_cfg.image_size,
                                         aspect=self.settings.image_aspect)

  def prompt(self, turns: Sequence[tuple[str, str]], images: int) -> str:
    """The template text of (question, answer) turns; the last answer is "" (to come)."""
    conversation = []
    for i, (question, answer) in enumerate(turns):
      question = question + self.settings.prompt_suffix
      if i == 0 and images:
        question = self.instruction.IMAGE_MARKER * images + question
      conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return self.instruction.render(conversation, self.instruction.MPLUG_OWL2)

  def answer(self, prompts: Sequence[str], images: Sequence[Sequence[np.ndarray]]) -> list[str]:
    """Answers for a batch of rendered prompts, each with its images."""
    import jax

    ids = [self.instruction.tokenize_with_images(p, self.tokenizer) for p in prompts]
    rows, length = len(ids), bucket(max(len(x) for x in ids))
    slots = max(len(x) for x in images)
    batch = {"input_ids": np.full((rows, length), self.model_cfg.llm.pad_token_id, np.int32),
             "attention_mask": np.zeros((rows, length), np.int32)}
    for r, x in enumerate(ids):
      batch["input_ids"][r, :len(x)] = x
      batch["attention_mask"][r, :len(x)] = 1
    if slots:
      size = self.model_cfg.image_size
      batch["images"] = np.zeros((rows, slots, size, size, 3), np.float32)
      batch["image_mask"] = np.zeros((rows, slots), np.int32)
      for r, row in enumerate(images):
        for k, image in enumerate(row):
          batch["images"][r, k] = image
          batch["image_mask"][r, k] = 1
    self.family.check_images(batch)
    stops = [self.tokenizer.pieces(s) for s in self.settings.stop_strings if s != "</s>"]
    if stops:
      batch["stop_sequences"] = self.family.generation.stop_sequence_array(stops)
    base = jax.random.key(int(self.settings.seed))
    rngs = jax.vmap(lambda i: jax.random.fold_in(base, i))(
        np.arange(self.calls * 1_000_003, self.calls * 1_000_003 + rows))
    self.calls += 1
    result = self.generate(self.params, batch, rngs)
    tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
    return [self.decode(tokens[r, :lengths[r]]) for r in range(rows)]

  def decode(self, tokens: np.ndarray) -> str:
    """Text before `</s>` and the first stop string. Ids past the tokenizer's vocabulary
    (a model vocabulary larger than the tokenizer's, as in test checkpoints) have no text."""
    eos = self.model_cfg.llm.eos_token_id
    tokens = [int(t) for t in tokens]
    if eos in tokens:
      tokens = tokens[:tokens.index(eos)]
    text = self.tokenizer.decode([t for t in tokens if t < self.tokenizer.vocab_size])
    for stop in self.settings.stop_strings:
      if stop in text:
        text = text[:text.index(stop)]
    return text.strip()


def interactive(chat: Chat, images: list[np.ndarray], first: str | None) -> None:
  turns: list[tuple[str, str]] = []
  while True:
    if first is not None and not turns:
      question = first
    else:
      try:
        question = input("USER: ")
      except EOFError:
        break
    if not question.strip():
      break
    turns.append((question, ""))
    answer = chat.answer([chat.prompt(turns, len(images))], [images])[0]
    turns[-1] = (question, answer)
    print(f"ASSISTANT: {answer}", flush=True)
    if first is not None:
      break


def batch_mode(chat: Chat, source: str, output: str) -> int:
  rows = []
  with open(source) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise UsageError(f"{source}:{n}: not JSON ({e})") from None
      if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise UsageError(f"{source}:{n}: needs a \"prompt\" string")
      paths = row.get("image") or []
      paths = [paths] if isinstance(paths, str) else list(paths)
      for p in paths:
        if not pathlib.Path(p).exists():
          raise UsageError(f"{source}:{n}: image {p} does not exist")
      rows.append((row.get("id", n), row["prompt"], paths))
  size = int(chat.settings.batch_size)
  with open(output, "w") as out:
    for start in range(0, len(rows), size):
      part = rows[start:start + size]
      images = [[chat.load_image(p) for p in paths] for _, _, paths in part]
      prompts = [chat.prompt([(q, "")], len(imgs)) for (_, q, _), imgs in zip(part, images)]
      for (ident, question, _), answer in zip(part, chat.answer(prompts, images)):
        out.write(json.dumps({"id": ident, "prompt": question, "answer": answer}) + "\n")
  return len(rows)


def main(argv: Sequence[str] | None = None) -> None:
  fv = flag_values()
  cli.parse(fv, argv, __doc__)
  try:
    run(fv)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def run(fv: flags.FlagValues) -> None:
  if not fv.checkpoint:
    raise UsageError("--checkpoint is required")
  settings = fv.config if fv.config is not None else default_settings()
  chat = Chat(fv.checkpoint, fv.tokenizer, settings)
  if fv.batch:
    if not fv.output:
      raise UsageError("--batch needs --output")
    n = batch_mode(chat, fv.batch, fv.output)
    print(f"wrote {n} answers to {fv.output}", file=sys.stderr)
    return
  for path in fv.image:
    if not pathlib.Path(path).exists():
      raise UsageError(f"image {path} does not exist")
  images = [chat.load_image(p) for p in fv.image]
  interactive(chat, images, fv.prompt)


if __name__ == "__main__":
  main()
