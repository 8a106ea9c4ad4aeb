"""Text side of the input pipeline: official cleaning rules, BERT WordPiece, task encodings.

Spec: `shared/spec/mplug2.md` sections 6.1, 6.2 and 7; `shared/spec/datasets.md` section 1.

The tokenizer is BERT uncased WordPiece built with the `tokenizers` library from a plain
`vocab.txt`. It reproduces the official (slow, `transformers`-style) `BertTokenizer`: lower
casing, accent stripping, BERT basic pre-tokenisation, never splitting the special tokens
(so a literal "[SEP]" in the text becomes id 102), and the official single-sequence
convention `[CLS] X` **without** a trailing `[SEP]`.

All encoders return fixed-length int32 numpy arrays (right padding with `[PAD]` = 0) because
the pipeline batches to static shapes; the official code pads to the longest sequence of the
batch, which differs only in padding that the masks hide.
"""

from __future__ import annotations

import pathlib
import re
import unicodedata
from typing import Sequence

import numpy as np

from mplug2_jax.tokens import BERT_CLS_ID as CLS_ID, BERT_MASK_ID as MASK_ID
from mplug2_jax.tokens import BERT_PAD_ID as PAD_ID, BERT_SEP_ID as SEP_ID, IGNORE_INDEX

UNK_ID = 100
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# The bert-base-uncased WordPiece vocabulary (30,522 entries) ships with the package;
# configs name it by this alias (`data.vocab_file`), so they work on any machine.
BERT_VOCAB_ALIAS = "bert-base-uncased"
BERT_VOCAB_FILE = pathlib.Path(__file__).resolve().parent / "vocab" / "bert-base-uncased.txt"

# --------------------------------------------------------------------------------------
# Official cleaning rules (datasets.md section 1).
# --------------------------------------------------------------------------------------

_DELETED = re.compile(r"[,.'!?\"()*#:;~]")


def resolve_vocab(vocab_file: str) -> str:
  """`data.vocab_file`: the alias "bert-base-uncased" (the shipped file) or a path."""
  if vocab_file == BERT_VOCAB_ALIAS:
    return str(BERT_VOCAB_FILE)
  return vocab_file


def is_blank(text: str) -> bool:
  """True when `text` has no visible character: only whitespace, control and format
  characters (e.g. "\\x00\\u200b"). BERT's basic tokenizer deletes all of them, so such a
  text would train as a [CLS]-only sequence; builders and the pipeline count it as
  `empty_text`."""
  return all(unicodedata.category(ch)[0] in "CZ" for ch in text)


def pre_question(text: str, max_words: int) -> str:
  """Lower-case, delete punctuation, '-' and '/' -> space, rstrip, keep `max_words` words.

  Splitting is on single spaces, so a run of spaces yields empty "words" that count towards
  `max_words` (as in the official code).
  """
  text = _DELETED.sub("", text.lower()).replace("-", " ").replace("/", " ")
  text = text.rstrip(" ")
  words = text.split(" ")
  if len(words) > max_words:
    text = " ".join(words[:max_words])
  return text


def pre_caption(text: str, max_words: int) -> str:
  """`pre_question`'s deletions plus `<person>` -> person, whitespace runs collapsed, strip."""
  text = _DELETED.sub("", text.lower()).replace("-", " ").replace("/", " ")
  text = text.replace("<person>", "person")
  text = re.sub(r"\s{2,}", " ", text)
  text = text.rstrip("\n").strip(" ")
  words = text.split(" ")
  if len(words) > max_words:
    text = " ".join(words[:max_words])
  return text


# --------------------------------------------------------------------------------------
# WordPiece tokenizer.
# --------------------------------------------------------------------------------------


class WordPieceTokenizer:
  """BERT uncased WordPiece from a vocab file, with the official encode/decode conventions.

  Picklable (the `tokenizers.Tokenizer` pickles), so it can travel to Grain workers.
  """

  def __init__(self, vocab_file: str, lowercase: bool = True):
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

    self.vocab_file = vocab_file
    tok = Tokenizer(models.WordPiece.from_file(vocab_file, unk_token="[UNK]",
                                               max_input_chars_per_word=100))
    # strip_accents=None follows `lowercase`, as BERT's basic tokenizer does.
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # Special tokens are matched on the raw text and never split (the slow tokenizer's
    # "no split" tokens); normalized=False keeps "[sep]" (lower case) an ordinary word.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t in SPECIAL_TOKENS])
    self._tok = tok
    for token, expected in zip(SPECIAL_TOKENS, (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)):
      got = tok.token_to_id(token)
      if got != expected:
        raise ValueError(f"{vocab_file}: {token} has id {got}, expected {expected} "
                         "(not a BERT uncased vocabulary?)")

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=False)

  def pieces(self, text: str) -> list[int]:
    """Word-piece ids of `text`, no special tokens added."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode(self, text: str, max_length: int | None = None) -> list[int]:
    """Official single-sequence encoding: `[CLS] X` (no `[SEP]`), truncated to max_length."""
    ids = [CLS_ID] + self.pieces(text)
    return ids if max_length is None else ids[:max_length]

  def encode_padded(self, text: str, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """`encode` truncated and right-padded to `max_length`: (ids, mask) int32."""
    return pad(self.encode(text, max_length), max_length)

  def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
    return [self._tok.id_to_token(int(i)) or "[UNK]" for i in ids]

  def decode(self, ids: Sequence[int]) -> str:
    """Like `transformers` `decode` (special tokens kept, "##" joined, spaces cleaned)."""
    text = " ".join(self.convert_ids_to_tokens(ids)).replace(" ##", "").strip()
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                 (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                 (" 're", "'re")):
      text = text.replace(a, b)
    return text

  def decode_prediction(self, ids: Sequence[int]) -> str:
    """Official post-processing of generated ids: decode, drop [SEP]/[CLS]/[PAD], strip."""
    text = self.decode(ids)
    for token in ("[SEP]", "[CLS]", "[PAD]"):
      text = text.replace(token, "")
    return text.strip()


def pad(ids: Sequence[int], max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads (or truncates) to `max_length`: (ids, mask) int32."""
  ids = list(ids)[:max_length]
  out = np.zeros((max_length,), np.int32)
  out[:len(ids)] = ids
  mask = np.zeros((max_length,), np.int32)
  mask[:len(ids)] = 1
  return out, mask


# --------------------------------------------------------------------------------------
# Task encodings.
# --------------------------------------------------------------------------------------


def caption_prompt_length(tokenizer: WordPieceTokenizer, prompt: str, off_by_one: bool) -> int:
  """Number of leading label positions masked for the prompt.

  Official (`off_by_one=True`): `len(tokenizer(prompt).input_ids) - 1`; as the tokenizer adds
  no `[SEP]`, that masks `[CLS]` and all but the last prompt piece, so the model is trained
  to predict the last prompt piece (spec 6.1). `off_by_one=False` masks the whole prompt.
  """
  if not prompt:
    return 1 if not off_by_one else 0  # nothing but [CLS] to mask
  n = len(tokenizer.encode(prompt))
  return n - 1 if off_by_one else n


def encode_caption(tokenizer: WordPieceTokenizer, caption: str, *, prompt: str = "a video of",
                   prompt_join: str = "", eos: str = "[SEP]", max_length: int = 20,
                   off_by_one: bool = True) -> dict[str, np.ndarray]:
  """Caption decoder input and labels (spec 6.1).

  Official defaults: text = prompt + caption + eos joined **without a space**
  ("a video ofa man is singing[SEP]"), truncated to 20 tokens (a long caption loses its
  `[SEP]`), labels = ids with `[PAD]` and the first `prompt_length` positions set to -100.
  Labels are *not* shifted: the loss compares logits[:, :-1] with labels[:, 1:].
  `prompt_join=" "` and `off_by_one=False` give the evidently intended behaviour.
  """
  text = (prompt + prompt_join if prompt else "") + caption + eos
  ids, mask = tokenizer.encode_padded(text, max_length)
  labels = np.where(mask == 1, ids, IGNORE_INDEX).astype(np.int32)
  labels[:caption_prompt_length(tokenizer, prompt, off_by_one)] = IGNORE_INDEX
  return {"caption_ids": ids, "caption_mask": mask, "caption_labels": labels}


def encode_answer(tokenizer: WordPieceTokenizer, answer: str,
                  max_length: int) -> dict[str, np.ndarray]:
  """Answer decoder input `[CLS] answer [SEP]` (raw answer + "[SEP]"), labels PAD -> -100.

  The official code never truncates answers; static shapes need `max_length` (the pipeline
  counts answers that do not fit as `answer_truncated`).
  """
  ids, mask = tokenizer.encode_padded(answer + "[SEP]", max_length)
  labels = np.where(mask == 1, ids, IGNORE_INDEX).astype(np.int32)
  return {"answer_ids": ids, "answer_mask": mask, "answer_labels": labels}


def vqa_answer_weights(answers: Sequence[str] | str, dataset: str = "vqa",
                       ) -> tuple[list[str], list[float]]:
  """M1 training weights (datasets.md 3.4): vqa -> share of annotators per distinct answer
  (sums to 1), vg/gqa -> the single answer with weight 0.5; other data -> weight 1 each."""
  if isinstance(answers, str):
    answers = [answers]
  if dataset == "vqa":
    distinct: dict[str, float] = {}
    for a in answers:
      distinct[a] = distinct.get(a, 0.0) + 1.0 / len(answers)
    return list(distinct), list(distinct.values())
  if dataset in ("vg", "gqa"):
    return [answers[0]], [0.5]
  return list(answers), [1.0] * len(answers)
