"""SentencePiece tokenizer and a CLI to train a vocabulary on a text corpus.

The mPLUG-2 checkpoints use BERT WordPiece (`text.py`); SentencePiece is for text-only
corpora in other languages or for models trained from scratch. SentencePiece cannot reuse
the BERT ids (unk 100 etc.), so trained models reserve pad=0, unk=1, bos (the `[CLS]` role)=2,
eos (`[SEP]`)=3 and `[MASK]` as a user symbol; `SentencePieceTokenizer` exposes them.

`layout="llama"` trains a LLaMA-style model instead (mPLUG-Owl2, `owl2.md` section 6):
`<unk>`=0, `<s>`=1, `</s>`=2, no pad piece (Owl2 pads with `<unk>`), byte fallback, digits
split, whitespace kept as written (a trailing space becomes its own `▁` piece, which the
official loss masking counts on; see `instruction.py`).

  python -m mplug2_jax.data.spm --input corpus.txt --model_prefix /tmp/spm --vocab_size 8000
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np

from mplug2_jax.data import text as text_lib


# Special ids and normalisation per layout (see the module docstring).
LAYOUTS = {
    "bert": dict(pad_id=0, unk_id=1, bos_id=2, eos_id=3, user_defined_symbols=["[MASK]"]),
    "llama": dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
                  split_digits=True, normalization_rule_name="identity",
                  remove_extra_whitespaces=False, allow_whitespace_only_pieces=True),
}


def train(input_files: Sequence[str], model_prefix: str, vocab_size: int,
          model_type: str = "unigram", character_coverage: float = 1.0,
          input_sentence_size: int = 1_000_000, layout: str = "bert") -> str:
  """Trains a SentencePiece model; returns the path of `<model_prefix>.model`."""
  import sentencepiece as spm

  spm.SentencePieceTrainer.train(
      input=",".join(input_files), model_prefix=model_prefix, vocab_size=vocab_size,
      model_type=model_type, character_coverage=character_coverage,
      input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
      hard_vocab_limit=False, minloglevel=2, **LAYOUTS[layout])
  return model_prefix + ".model"


class SentencePieceTokenizer:
  """Same encode conventions as `text.WordPieceTokenizer` (bos first, no eos, padded)."""

  def __init__(self, model_file: str):
    import sentencepiece as spm

    self.model_file = model_file
    self._sp = spm.SentencePieceProcessor(model_file=model_file)
    self.pad_id, self.unk_id = self._sp.pad_id(), self._sp.unk_id()
    self.cls_id, self.sep_id = self._sp.bos_id(), self._sp.eos_id()
    self.bos_id, self.eos_id = self.cls_id, self.sep_id  # LLaMA names of the same ids
    self.mask_id = self._sp.piece_to_id("[MASK]")

  def __getstate__(self):
    return {"model_file": self.model_file}

  def __setstate__(self, state):
    self.__init__(state["model_file"])

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def pieces(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode(self, text: str, max_length: int | None = None) -> list[int]:
    ids = [self.cls_id] + self.pieces(text)
    return ids if max_length is None else ids[:max_length]

  def encode_padded(self, text: str, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = text_lib.pad(self.encode(text, max_length), max_length)
    return np.where(mask == 1, ids, self.pad_id).astype(np.int32), mask

  def decode(self, ids: Sequence[int]) -> str:
    special = {self.pad_id, self.cls_id, self.sep_id}
    return self._sp.decode([int(i) for i in ids if int(i) not in special])


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--input", nargs="+", required=True, help="plain-text files, one sentence a line")
  parser.add_argument("--model_prefix", required=True)
  parser.add_argument("--vocab_size", type=int, default=8000)
  parser.add_argument("--model_type", default="unigram", choices=("unigram", "bpe", "char", "word"))
  parser.add_argument("--character_coverage", type=float, default=1.0)
  parser.add_argument("--layout", default="bert", choices=sorted(LAYOUTS))
  args = parser.parse_args(argv)
  path = train(args.input, args.model_prefix, args.vocab_size, args.model_type,
               args.character_coverage, layout=args.layout)
  tok = SentencePieceTokenizer(path)
  print(f"wrote {path} ({tok.vocab_size} pieces)")


if __name__ == "__main__":
  main(sys.argv[1:])
