"""mPLUG-Owl2 instruction tuning data: conversation -> token ids + labels -> static batches.

Spec: `shared/spec/datasets.md` 4.1 (instruction JSON, cleaning, which records are kept),
`shared/spec/owl2.md` 6 (template, tokenisation, loss mask, collator) and 7 (images).
`ALIAS:line` citations use the aliases of `owl2.md` section 0 (TR = train/train.py,
CO = conversation.py, MU = mm_utils.py, K = constants.py, all of the official mPLUG-Owl2).

Flow, following the official `LazySupervisedDataset` + `preprocess_v1` + collator:

  record  built by `sources.instruction`: texts[0] = the conversation as JSON,
          media = the image file (b"" for a text-only conversation)
  -> clean_conversation  drop a leading non-human turn, check alternation, move `<|image|>`
                         to the front of its message (TR:284-294, 308-315)
  -> render              Vicuna-v1 prompt: "SYSTEM USER: q1 ASSISTANT: a1</s>USER: q2 ..."
  -> tokenize            LLaMA SentencePiece: BOS first, "</s>" -> EOS id, `<|image|>` -> -200
  -> official_labels     loss only on assistant answers and their "</s>" (TR:297-376)
  -> truncate            to max_length raw ids (official: before image expansion)
  -> collate             pad to a fixed length: ids 0, labels -100, attention = ids != 0,
                         images (zeros for text-only samples), per-sample truncation flags

The tokenizer is `spm.SentencePieceTokenizer` of a LLaMA-layout model (`<unk>`=0, `<s>`=1,
`</s>`=2; `spm.train(layout="llama")` makes small ones for tests). Ids are those of the
official slow LLaMA tokenizer as long as the SentencePiece model is LLaMA's own.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Callable, Sequence

import numpy as np

from mplug2_jax.data import media
from mplug2_jax.tokens import IGNORE_INDEX, IMAGE_TOKEN_INDEX, LLAMA_PAD_ID

IMAGE_MARKER = "<|image|>"  # K:9 (not LLaVA's "<image>"); not a vocabulary entry
# The image placeholder id (official K:8; the model splices the image's tokens in its
# place), the ignored label, and pad = <unk> = 0 with right padding (TR:707, 712).
IMAGE_TOKEN_ID, PAD_ID = IMAGE_TOKEN_INDEX, LLAMA_PAD_ID
PAD_RGB = (122, 116, 104)   # square canvas colour = int(CLIP mean * 255) (MU:15-26, 37)
ROLES = ("human", "gpt")    # JSON `from` values of the user and the assistant (TR:303)


@dataclasses.dataclass(frozen=True)
class Template:
  """A chat template with two separators (the official `SeparatorStyle.TWO`)."""

  system: str
  roles: tuple[str, str]  # (user, assistant)
  sep: str                # after the system prompt and after each user message
  sep2: str               # after each assistant message


# `scripts/finetune.sh --version v1` (SF:8) selects `vicuna_v1` (TR:713-716, CO:265-275).
# (Inference uses another template without system prompt, CO:277-287; owl2.md bug 13.)
VICUNA_V1 = Template(
    system="A chat between a curious user and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    roles=("USER", "ASSISTANT"), sep=" ", sep2="</s>")
# Inference (CLI, README, benchmarks): `mplug_owl2` (CO:277-287), no system prompt
# (`SeparatorStyle.TWO_NO_SYS`): "USER: <|image|>q ASSISTANT: a</s>USER: q2 ASSISTANT:".
MPLUG_OWL2 = Template(system="", roles=("USER", "ASSISTANT"), sep=" ", sep2="</s>")


# --------------------------------------------------------------------------------------
# Conversations: cleaning (official) and the stricter checks applied at build time.
# --------------------------------------------------------------------------------------


def clean_conversation(turns: Any, has_image: bool) -> list[dict[str, str]]:
  """The official per-sample text preprocessing; raises `media.BadSample("bad_text")`
  where the official code would crash (unknown role, turns not alternating).

  A leading assistant turn is dropped (only one, TR:308-310); the rest must alternate
  human, gpt, ... (TR:315). With an image, each message containing the marker loses all its
  markers and starts with one marker + newline, stripped (TR:284-294). Idempotent, so
  conversations stored already cleaned by the importer can pass again.
  """
  if not isinstance(turns, list) or not all(
      isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
    raise media.BadSample("bad_text", "conversations is not a list of {from, value}")
  if any(t.get("from") not in ROLES for t in turns):
    raise media.BadSample("bad_text", f"roles {[t.get('from') for t in turns]} not in {ROLES}")
  if turns and turns[0]["from"] != ROLES[0]:
    turns = turns[1:]
  if not turns:
    raise media.BadSample("empty_text", "no conversation turns")
  out = []
  for i, t in enumerate(turns):
    if t["from"] != ROLES[i % 2]:
      raise media.BadSample("bad_text", f"turn {i} is from {t['from']!r}, not {ROLES[i % 2]!r}")
    value = t["value"]
    if has_image and IMAGE_MARKER in value:
      value = (IMAGE_MARKER + "\n" + value.replace(IMAGE_MARKER, "").strip()).strip()
    out.append({"from": t["from"], "value": value})
  return out


def import_conversation(turns: Any, has_image: bool) -> list[dict[str, str]]:
  """Build-time cleaning: `clean_conversation` plus rejections (`media.BadSample`) of
  records the official loader would use wrongly (datasets.md 4.1):

    empty_text  a message that is empty or blank (it would render as "ROLE:" without
                separator and break the round structure of the loss mask)
    bad_text    text not encodable as UTF-8 (lone surrogates from JSON escapes); a malformed
                conversation; an image without any marker (officially the image is silently
                unused, e.g. LLaVA's `<image>` not rewritten); markers in two messages (the
                second would take the next sample's image); a marker without an image.
  """
  for t in turns if isinstance(turns, list) else ():
    value = t.get("value") if isinstance(t, dict) else None
    if isinstance(value, str) and not value.strip():
      raise media.BadSample("empty_text", f"empty {t.get('from')} message")
    try:
      if isinstance(value, str):
        value.encode("utf-8")
    except UnicodeEncodeError:
      raise media.BadSample("bad_text", "message is not UTF-8") from None
  turns = clean_conversation(turns, has_image)
  marked = sum(IMAGE_MARKER in t["value"] for t in turns)
  if has_image and marked != 1:
    raise media.BadSample("bad_text", f"image record with {IMAGE_MARKER} in {marked} messages")
  if not has_image and marked:
    raise media.BadSample("bad_text", f"{IMAGE_MARKER} in a record without image")
  return turns


def render(turns: Sequence[dict[str, str]], template: Template = VICUNA_V1) -> str:
  """The prompt text of the official `get_prompt` for `SeparatorStyle.TWO` (a template
  without system prompt: `TWO_NO_SYS`, nothing before the first turn)."""
  text = template.system + template.sep if template.system else ""
  for i, t in enumerate(turns):
    role, sep = template.roles[i % 2], (template.sep, template.sep2)[i % 2]
    # Official: an empty message renders as "ROLE:" with no separator (the importer drops
    # records with empty messages, so only hand-made input gets here).
    text += f"{role}: {t['value']}{sep}" if t["value"] else f"{role}:"
  return text


# --------------------------------------------------------------------------------------
# Tokenisation as the official slow LLaMA tokenizer + `tokenizer_image_token` do it.
# --------------------------------------------------------------------------------------

_SPECIAL = re.compile(r"(<unk>|<s>|</s>)")


def tokenize_text(text: str, tokenizer) -> list[int]:
  """`tokenizer(text).input_ids`: BOS, then the text. The tokenizer's special-token strings
  (the template's "</s>", also "<s>", "<unk>") become their single ids, and each stretch of
  text between them is encoded on its own, so SentencePiece puts its word-start marker on
  the first piece after every "</s>" (as the official legacy tokenizer does)."""
  special = {"<unk>": tokenizer.unk_id, "<s>": tokenizer.bos_id, "</s>": tokenizer.eos_id}
  ids = [tokenizer.bos_id]
  for part in _SPECIAL.split(text):
    if part in special:
      ids.append(special[part])
    elif part:
      ids.extend(tokenizer.pieces(part))
  return ids


def tokenize_with_images(text: str, tokenizer) -> list[int]:
  """`tokenizer_image_token` (MU:53-72; owl2.md 6): the text is split on `<|image|>`, each
  chunk tokenized separately (each with BOS) and one -200 put between chunks. If the first
  chunk has tokens, its BOS is the only one kept; if the text starts with the marker, every
  chunk keeps its BOS (`[-200, 1, ...]`). Text after a marker starts a fresh sequence."""
  chunks = [tokenize_text(c, tokenizer) if c else [] for c in text.split(IMAGE_MARKER)]
  drop_bos = bool(chunks[0])
  ids = list(chunks[0])
  for chunk in chunks[1:]:
    ids.append(IMAGE_TOKEN_ID)
    ids.extend(chunk[1:] if drop_bos else chunk)
  return ids


def official_labels(prompt: str, ids: Sequence[int], tokenize: Callable[[str], list[int]],
                    max_length: int, template: Template = VICUNA_V1,
                    ) -> tuple[np.ndarray, bool]:
  """`preprocess_v1` masking (TR:297-376); returns (labels, mismatch).

  BOS is masked. The prompt is split into rounds on `sep2` ("</s>"), each round into
  instruction and answer on " ASSISTANT: ". Token counts come from tokenizing each piece
  on its own:
    round_len        = len(tokenize(round)); its BOS stands in for the round's closing
                       "</s>" in the full sequence, so the "</s>" stays supervised.
    instruction_len  = len(tokenize(instruction + " ASSISTANT: ")) - 2: one for that BOS,
                       one for the lone "▁" the trailing space becomes when tokenized alone
                       (in the full text the space is the word-start marker of the answer's
                       first piece). This holds for LLaMA's tokenizer, which keeps
                       whitespace; with one that drops a trailing space the last instruction
                       token (":") would be supervised. Where the answer's first piece does
                       not absorb the space (LLaMA splits digits: " 7" -> "▁", "7") that lone
                       "▁" stays in the full text and is supervised, as officially.
  The instruction span is masked, the position advances by round_len, and everything after
  the last round is masked. A round that does not split into exactly two parts (a message
  containing " ASSISTANT: ", or a conversation ending with a user turn) ends the loop.
  Official defect kept: if the counted length differs from the real one and is below
  `max_length`, the whole sample is masked ("tokenization mismatch", TR:365-371). That
  happens when a message contains " ASSISTANT: " or "</s>", and when the conversation ends
  with a user turn (its uncounted round), so such samples carry no loss at all. The real
  length is the number of ids that are not the pad id, and pad == <unk>, so an `<unk>`
  inside the text triggers it too.
  """
  labels = np.asarray(ids, np.int32).copy()
  answer_sep = template.sep + template.roles[1] + ": "
  cur = 1
  labels[:cur] = IGNORE_INDEX
  for rnd in prompt.split(template.sep2):
    if not rnd:
      break
    parts = rnd.split(answer_sep)
    if len(parts) != 2:
      break
    round_len = len(tokenize(rnd))
    instruction_len = len(tokenize(parts[0] + answer_sep)) - 2
    labels[cur:cur + instruction_len] = IGNORE_INDEX
    cur += round_len
  labels[cur:] = IGNORE_INDEX
  total = int(np.sum(np.asarray(ids) != PAD_ID))
  mismatch = cur < max_length and cur != total
  if mismatch:
    labels[:] = IGNORE_INDEX
  return labels, mismatch


def kept_length(ids: Sequence[int], max_length: int, tokens_per_image: int = 1) -> int:
  """How many ids survive truncation. Official (`tokens_per_image=1`): the first
  `max_length` raw ids (TR:605-606), whose expanded sequence can be longer than max_length
  (owl2.md bug 14). With `tokens_per_image` = LLM positions per image (65 for the 7B
  model), the longest prefix whose expanded length fits."""
  cost = np.where(np.asarray(ids) == IMAGE_TOKEN_ID, tokens_per_image, 1)
  return int(np.searchsorted(np.cumsum(cost), max_length, side="right"))


def encode_conversation(conversation: Sequence[dict[str, str]], tokenizer, max_length: int, *,
                        has_image: bool | None = None, template: Template = VICUNA_V1,
                        tokens_per_image: int = 1) -> dict[str, Any]:
  """One conversation -> dict(input_ids, labels: int32 (n,), n <= max_length,
  truncated: bool, mismatch: bool (whole sample masked, see `official_labels`)).

  `has_image` is whether the record has an image (official: the `image` key); default:
  whether a message contains the marker. Only with an image is the marker turned into -200;
  without, the text is tokenized as it is (TR: `preprocess_v1(has_image=...)`).
  """
  if has_image is None:
    has_image = any(isinstance(t, dict) and IMAGE_MARKER in str(t.get("value"))
                    for t in conversation)
  prompt = render(clean_conversation(list(conversation), has_image), template)
  tokenize_fn = tokenize_with_images if has_image else tokenize_text
  tokenize = lambda text: tokenize_fn(text, tokenizer)
  ids = tokenize(prompt)
  labels, mismatch = official_labels(prompt, ids, tokenize, max_length, template)
  n = kept_length(ids, max_length, tokens_per_image)
  return dict(input_ids=np.asarray(ids[:n], np.int32), labels=labels[:n],
              truncated=n < len(ids), mismatch=mismatch)


# --------------------------------------------------------------------------------------
# Images, records and batches.
# --------------------------------------------------------------------------------------


ASPECT_MODES = ("pad", "resize", "crop")


def image_pixels(image: np.ndarray, size: int = 448, aspect: str = "pad") -> np.ndarray:
  """uint8 (H, W, 3) -> float32 (size, size, 3) as `process_images` (MU:29-50, TR:548-562;
  owl2.md 7), then the CLIP processor: shorter side to `size` (PIL bicubic, the longer
  side truncated as `int(size * long / short)`), centre crop (offset (extent - size) // 2),
  /255 and CLIP mean/std.

    "pad"     (training, the official CLI) centred on a square canvas of PAD_RGB (offset
              (long - short) // 2) first
    "resize"  (official default without a config) stretched to a max(W, H) square first,
              PIL's default filter (bicubic)
    "crop"    (any other setting) the CLIP processor alone
  """
  from PIL import Image

  if aspect not in ASPECT_MODES:
    raise ValueError(f"image aspect mode {aspect!r} not in {ASPECT_MODES}")
  h, w = image.shape[:2]
  side = max(h, w)
  picture = Image.fromarray(image)
  if aspect == "pad":
    picture = Image.new("RGB", (side, side), PAD_RGB)
    picture.paste(Image.fromarray(image), ((side - w) // 2, (side - h) // 2))
  elif aspect == "resize":
    picture = picture.resize((side, side), Image.BICUBIC)
  width, height = picture.size
  short, long = min(width, height), max(width, height)
  scaled = (size, int(size * long / short))
  new = scaled if width <= height else scaled[::-1]
  resized = np.asarray(picture.resize(new, Image.BICUBIC))
  top, left = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
  return media.normalize(resized[None, top:top + size, left:left + size])[0]


def record_conversation(record: dict[str, Any]) -> list[dict[str, str]]:
  """The conversation stored in texts[0] of an `instruction` record (bytes once read back)."""
  text = record["texts"][0]
  try:
    text = text if isinstance(text, str) else bytes(text).decode("utf-8")
  except UnicodeDecodeError:
    raise media.BadSample("bad_text", "conversation is not UTF-8") from None
  return json.loads(text)


def encode_record(record: dict[str, Any], tokenizer, max_length: int, image_size: int = 448,
                  tokens_per_image: int = 1) -> dict[str, Any]:
  """A built record -> `encode_conversation` output + image (size, size, 3) + has_image.
  A text-only record gets a zero image so that every sample fills one image slot (TR:580-585;
  the model consumes one image per sample, owl2.md bug 11). Raises `media.BadSample`."""
  data = bytes(record.get("media", b""))
  example = encode_conversation(record_conversation(record), tokenizer, max_length,
                                has_image=bool(data), tokens_per_image=tokens_per_image)
  if data:
    example["image"] = image_pixels(media.decode_image(data)[0], image_size)
  else:
    example["image"] = np.zeros((image_size, image_size, 3), np.float32)
  example["has_image"] = bool(data)
  return example


def collate(examples: Sequence[dict[str, Any]], max_length: int) -> dict[str, np.ndarray]:
  """Encoded examples -> fixed-shape batch (the official collator TR:589-620, padded to
  `max_length` instead of the longest sample so that shapes are static under jit):

    input_ids, labels, attention_mask  int32 (B, max_length); pad id 0, label -100, right
                                       padding; attention = ids != pad (official, so an
                                       `<unk>` in the text is hidden too)
    truncated                          bool (B,): ids were cut at encoding or here
    images f32 (B, S, S, 3), has_image int32 (B,)   when the examples carry images
  """
  b = len(examples)
  ids = np.full((b, max_length), PAD_ID, np.int32)
  labels = np.full((b, max_length), IGNORE_INDEX, np.int32)
  truncated = np.zeros(b, bool)
  for i, ex in enumerate(examples):
    n = min(len(ex["input_ids"]), max_length)
    ids[i, :n], labels[i, :n] = ex["input_ids"][:n], ex["labels"][:n]
    truncated[i] = bool(ex.get("truncated")) or len(ex["input_ids"]) > max_length
  batch = dict(input_ids=ids, labels=labels, attention_mask=(ids != PAD_ID).astype(np.int32),
               truncated=truncated)
  if examples and "image" in examples[0]:
    batch["images"] = np.stack([ex["image"] for ex in examples]).astype(np.float32)
    batch["has_image"] = np.array([ex["has_image"] for ex in examples], np.int32)
  return batch


# --------------------------------------------------------------------------------------
# The Grain pipeline's `instruct` task: one record -> one example of the Owl2 batch schema.
# --------------------------------------------------------------------------------------

TRUNCATIONS = ("expanded", "raw")
FORMATS = ("conversation", "caption")


def encode_caption(caption: str, tokenizer, max_length: int,
                   tokens_per_image: int = 1) -> dict[str, Any]:
  """An image-text pair as one plain sequence for stage-1 pre-training:
  `<|image|>` + caption + `</s>` -> [-200, BOS, caption..., EOS], loss on the caption and
  its EOS only. (LLaVA's PLAIN template; the official Owl2 code has no reachable stage-1
  format, owl2.md bug 13, and the paper does not give one: our choice, unverified.)"""
  if not caption.strip():
    raise media.BadSample("empty_text", "empty caption")
  ids = tokenize_with_images(IMAGE_MARKER + caption.strip() + "</s>", tokenizer)
  labels = np.asarray(ids, np.int32).copy()
  labels[:2] = IGNORE_INDEX  # the placeholder and the BOS after it
  n = kept_length(ids, max_length, tokens_per_image)
  return dict(input_ids=np.asarray(ids[:n], np.int32), labels=labels[:n],
              truncated=n < len(ids), mismatch=False)


def schema_example(encoded: dict[str, Any], image: np.ndarray | None, max_length: int,
                   slots: int) -> dict[str, np.ndarray]:
  """An encoded sample padded to the fixed batch row of `models/owl2/schema.py`:
  input_ids / attention_mask / labels (max_length,), right padding with the pad id (the
  official collator: attention = ids != pad), and `slots` image slots; slot 0 holds the
  image when its placeholder survived truncation (a cut image is dropped with its
  placeholder, never half kept), text-only samples fill no slot."""
  ids = np.full(max_length, PAD_ID, np.int32)
  labels = np.full(max_length, IGNORE_INDEX, np.int32)
  n = min(len(encoded["input_ids"]), max_length)
  ids[:n], labels[:n] = encoded["input_ids"][:n], encoded["labels"][:n]
  out = dict(input_ids=ids, attention_mask=(ids != PAD_ID).astype(np.int32), labels=labels)
  placeholders = int(np.sum(ids == IMAGE_TOKEN_ID))
  if placeholders > slots:
    raise media.BadSample("bad_text", f"{placeholders} image placeholders, "
                          f"{slots} image slots (data.images_per_sample)")
  if slots:
    if image is None and placeholders:
      raise media.BadSample("bad_text", "image placeholder without an image")
    size = image.shape[0] if image is not None else 0
    out["image_mask"] = (np.arange(slots) < placeholders).astype(np.int32)
    if image is not None:
      images = np.zeros((slots,) + image.shape, np.float32)
      if placeholders:
        images[0] = image
      out["images"] = images
    else:
      out["images"] = np.zeros((slots, size, size, 3), np.float32)
  return out


def pipeline_example(record: dict[str, Any], tokenizer, *, max_length: int, image_size: int,
                     slots: int, tokens_per_image: int, truncation: str = "expanded",
                     fmt: str = "conversation", aspect: str = "pad",
                     template: Template = VICUNA_V1) -> dict[str, np.ndarray]:
  """A built record (`instruction` kind, or `image_text` with fmt="caption") -> one row of
  the Owl2 batch schema. `truncation`: "expanded" keeps the longest prefix whose *spliced*
  length (an image = `tokens_per_image` positions) fits `max_length` (owl2.md bug 14 done
  right); "raw" cuts the raw ids at `max_length` as the official collator does (an image
  still never loses part of its tokens: the model splices all of them, the static LLM
  length has room). Raises `media.BadSample` on bad data."""
  if truncation not in TRUNCATIONS:
    raise ValueError(f"config.data.truncation={truncation!r}: one of {TRUNCATIONS}")
  if fmt not in FORMATS:
    raise ValueError(f"config.data.instruct_format={fmt!r}: one of {FORMATS}")
  cost = tokens_per_image if truncation == "expanded" else 1
  data = bytes(record.get("media", b""))
  if fmt == "caption":
    if not data:
      raise media.BadSample("missing", "caption record without an image")
    texts = record["texts"]
    text = texts[0] if texts else b""
    try:
      caption = text if isinstance(text, str) else bytes(text).decode("utf-8")
    except UnicodeDecodeError:
      raise media.BadSample("bad_text", "caption is not UTF-8") from None
    encoded = encode_caption(caption, tokenizer, max_length, cost)
  else:
    encoded = encode_conversation(record_conversation(record), tokenizer, max_length,
                                  has_image=bool(data), template=template,
                                  tokens_per_image=cost)
  image = None
  if data:
    image = image_pixels(media.decode_image(data)[0], image_size, aspect)
  elif slots:
    image = np.zeros((image_size, image_size, 3), np.float32)
  return schema_example(encoded, image, max_length, slots)


# --------------------------------------------------------------------------------------
# Packing several conversations into one row (models/owl2/packing.py reads segment_ids).
# --------------------------------------------------------------------------------------


def real_length(row: dict[str, np.ndarray]) -> int:
  """Tokens of a right-padded row: up to its last attended position."""
  where = np.flatnonzero(np.asarray(row["attention_mask"]))
  return int(where[-1]) + 1 if where.size else 0


def pack(rows: list[dict[str, np.ndarray]], max_length: int, slots: int,
         num_rows: int | None = None) -> dict[str, np.ndarray]:
  """Right-padded schema rows (`schema_example`) -> packed rows with `segment_ids`
  (1, 2, ... per conversation, 0 = padding), first-fit by decreasing length: a row takes
  conversations while its raw length stays <= max_length and its images fit the `slots`
  image slots (filled in placeholder order). `num_rows`: the fixed number of rows (a
  ValueError names the shortfall if they do not fit); default: as many as needed."""
  order = sorted(range(len(rows)), key=lambda i: -real_length(rows[i]))
  bins: list[list[int]] = []
  used: list[tuple[int, int]] = []
  for i in order:
    n, k = real_length(rows[i]), int(np.sum(rows[i].get("image_mask", 0)))
    if n > max_length or k > slots:
      raise ValueError(f"conversation {i}: {n} tokens / {k} images do not fit a row of "
                       f"{max_length} tokens / {slots} image slots")
    for b, (tokens, images) in enumerate(used):
      if tokens + n <= max_length and images + k <= slots:
        bins[b].append(i)
        used[b] = (tokens + n, images + k)
        break
    else:
      bins.append([i])
      used.append((n, k))
  count = len(bins) if num_rows is None else num_rows
  if len(bins) > count:
    raise ValueError(f"{len(rows)} conversations need {len(bins)} packed rows, "
                     f"only {count} given")
  out = dict(input_ids=np.full((count, max_length), PAD_ID, np.int32),
             attention_mask=np.zeros((count, max_length), np.int32),
             labels=np.full((count, max_length), IGNORE_INDEX, np.int32),
             segment_ids=np.zeros((count, max_length), np.int32))
  image_shape = next((r["images"].shape[1:] for r in rows if "images" in r), None)
  if image_shape is not None:
    out["images"] = np.zeros((count, slots) + tuple(image_shape), np.float32)
    out["image_mask"] = np.zeros((count, slots), np.int32)
  for b, members in enumerate(bins):
    pos, slot = 0, 0
    for seg, i in enumerate(sorted(members), start=1):
      r, n = rows[i], real_length(rows[i])
      for key in ("input_ids", "attention_mask", "labels"):
        out[key][b, pos:pos + n] = r[key][:n]
      out["segment_ids"][b, pos:pos + n] = seg
      pos += n
      for k in range(int(np.sum(r.get("image_mask", 0)))):
        out["images"][b, slot] = r["images"][k]
        out["image_mask"][b, slot] = 1
        slot += 1
  return out


def padding_fraction(batch: dict[str, np.ndarray], tokens_per_image: int) -> float:
  """Share of the LLM's positions that are padding: the static spliced length is
  L + K (tokens_per_image - 1) per row, the real content its attended tokens with each
  placeholder counting `tokens_per_image`."""
  ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
  rows, length = ids.shape
  slots = batch["images"].shape[1] if "images" in batch else 0
  total = rows * (length + slots * (tokens_per_image - 1))
  real = np.sum(mask) + np.sum((ids == IMAGE_TOKEN_ID) & (mask > 0)) * (tokens_per_image - 1)
  return float(1.0 - real / total)
