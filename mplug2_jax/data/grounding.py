"""Visual grounding (RefCOCO / RefCOCO+ / RefCOCOg): image + box geometry and box tokens.

Spec: `shared/spec/datasets.md` section 3.5 (TransVG-style transforms of the official mPLUG
grounding code, box targets as tokens) and `shared/spec/mplug2.md` sections 6.3 / 14
(`BertPrefixModelForGrounding`: the decoder generates box coordinates as tokens).

Geometry (pure numpy + Pillow on one uint8 (H, W, 3) image and a corner box in pixels):

  test  (`eval_transform`)  long side -> `size` (336) -> normalise (official: ImageNet
        mean/std) -> pad into size x size, image **centred**                   (spec 3.5)
  train (`train_transform`) [crop containing the box] -> long side -> a random scale
        <= size -> colour jitter -> horizontal flip (left/right swapped in the text)
        -> normalise (CLIP mean/std) -> pad into size x size at a **random offset**

and the box becomes (cx, cy, w, h) / size in the padded frame (the frame in which the
official metric computes IoU). Padding is applied to the normalised image, so padded pixels
are 0 (the mean colour) [pad value unverified].

The spec names the training augmentations ("multi-scale/crop, colour jitter, flip") but not
their parameters or exact rules; everything marked [unverified] below is this port's choice,
exposed in `config.data.grounding_*` (data/__init__.py). What is pinned by the spec: the 336
frame, long-side resizing at test, the padding placement (centred / random), the (cx, cy, w,
h) / 336 target, the two normalisations, and the token scheme.

Box tokens (spec 3.5, M1 `models/model_grounding_mplug.py:82-91,172-204`): each of the four
values is clamped to [0, 1] and quantised to q = floor(v * 336) in 0..336; its token is
`[unused{340 + q}]` (337 tokens); the decoder input starts with `[unused339]`; inference is 4
greedy steps restricted to those 337 tokens. This module is the one definition of that
scheme: the pipeline's training targets and `evaluate/tasks.py` both use it.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from mplug2_jax import tokens
from mplug2_jax.data import media
from mplug2_jax.data import text as text_lib

SIZE = 336                 # the official padded frame (image_res of the grounding config)

# ---- the token scheme (one definition; see the module docstring) ---------------------
BINS = 336                 # q = floor(v * BINS), v in [0, 1] -> q in 0..BINS
FIRST_COORD = 340          # q -> [unused{FIRST_COORD + q}]
PREFIX_TOKEN = "[unused339]"
NUM_COORD_TOKENS = BINS + 1
ANSWER_LEN = 5             # decoder input: prefix + 4 coordinate tokens (no end token)

# ImageNet statistics: the official test-time default (datasets.md 3.5, GD:383).
IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), np.float32)
NORMS = {"clip": (media.CLIP_MEAN, media.CLIP_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}

# Training defaults [unverified: the spec names the augmentations, not their parameters].
SCALE_STEP, NUM_SCALES = 32, 7   # long side in {size - 32 i : i = 0..6} (multi-scale)
CROP_PROB = 0.5                  # share of samples that are cropped before the resize
CROP_MIN = 0.5                   # smallest crop side, as a fraction of the image side
JITTER = 0.4                     # brightness / contrast / saturation factors in 1 +- 0.4
FLIP_PROB = 0.5


# --------------------------------------------------------------------------------------
# Box tokens.
# --------------------------------------------------------------------------------------


def coordinate_token(q: int) -> str:
  """The vocabulary token of quantised coordinate q (0..BINS)."""
  if not 0 <= q <= BINS:
    raise ValueError(f"coordinate bin {q} outside 0..{BINS}")
  return f"[unused{FIRST_COORD + q}]"


def quantize(box: np.ndarray) -> np.ndarray:
  """(cx, cy, w, h) in [0, 1] -> int32 bins: clamp to [0, 1], then floor(v * BINS).

  v = 1 is bin BINS, hence BINS + 1 tokens. The arithmetic is float32, as in the official
  torch code: a value that is exactly k / 336 in real numbers can round to just below it
  (e.g. float32(105 / 336) * 336 = 104.99999) and then lands in bin k - 1, as it does
  officially.
  """
  v = np.clip(np.asarray(box, np.float32), np.float32(0.0), np.float32(1.0))
  return np.floor(v * np.float32(BINS)).astype(np.int32)


def dequantize(q):
  """Bins -> box values q / BINS (numpy or jax arrays).

  How the official inference maps a token back to a value is not in the spec; q / BINS
  (the bin's lower edge, the inverse of floor) is used [unverified]."""
  return q / BINS


def token_id(tok, token: str) -> int:
  """Vocabulary id of `token`; the grounding scheme needs the BERT `[unusedN]` entries."""
  inner = getattr(tok, "_tok", None)  # WordPieceTokenizer's `tokenizers.Tokenizer`
  got = inner.token_to_id(token) if inner is not None else None
  if got is None:
    raise ValueError(f"{token} is not in the vocabulary (grounding box tokens need the BERT "
                     "uncased vocab.txt with its [unused] entries)")
  return int(got)


def token_ids(tok) -> tuple[int, np.ndarray]:
  """(prefix id, int32 (NUM_COORD_TOKENS,) ids of the coordinate tokens, index = bin)."""
  coords = np.array([token_id(tok, coordinate_token(q)) for q in range(NUM_COORD_TOKENS)],
                    np.int32)
  # The training loss restricts the logits to this id range (models/mplug2/objectives.py).
  want = np.arange(tokens.BERT_BOX_FIRST_ID, tokens.BERT_BOX_FIRST_ID + NUM_COORD_TOKENS)
  if not np.array_equal(coords, want):
    raise ValueError(f"the vocabulary's box tokens {coordinate_token(0)}.."
                     f"{coordinate_token(BINS)} are not ids {want[0]}..{want[-1]} of the BERT "
                     "uncased vocab.txt")
  return token_id(tok, PREFIX_TOKEN), coords


def answer_targets(box: np.ndarray, prefix_id: int, coord_ids: np.ndarray
                   ) -> dict[str, np.ndarray]:
  """Decoder rows (1, ANSWER_LEN) for one box, in the videoqa answer format.

  ids = [prefix, t(cx), t(cy), t(w), t(h)], mask all ones. The losses compare logits[:, :-1]
  with labels[:, 1:] (train/losses.py), so position t predicts token t + 1: the prefix
  predicts cx, ..., the token of w predicts h, and label[0] (the prefix) is never a target
  (-100). No end token: inference runs exactly 4 steps and never reads a 5th prediction
  (spec 3.5), so training one would only add a loss term nothing uses.
  """
  ids = np.concatenate([[prefix_id], coord_ids[quantize(box)]]).astype(np.int32)
  labels = ids.copy()
  labels[0] = text_lib.IGNORE_INDEX
  return {"answer_ids": ids[None], "answer_mask": np.ones((1, ANSWER_LEN), np.int32),
          "answer_labels": labels[None]}


# --------------------------------------------------------------------------------------
# Expression.
# --------------------------------------------------------------------------------------

# Whole words only (also leftmost / rightmost): "bright" or "copyright" must stay as they are.
_LEFT_RIGHT = re.compile(r"\b(left|right)(most)?\b")


def swap_left_right(expression: str) -> str:
  """left <-> right (and leftmost <-> rightmost), for horizontally flipped images."""
  return _LEFT_RIGHT.sub(lambda m: ("right" if m.group(1) == "left" else "left")
                         + (m.group(2) or ""), expression)


def encode_expression(tok, expression: str, max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """`[CLS] wordpieces [SEP]` right-padded with 0 to `max_length`, and its 0/1 mask.

  Spec 3.5 (GD:74-132,333-337): the expression is lower-cased, not cleaned otherwise. Long
  expressions keep their first max_length - 2 pieces, so [SEP] always ends the query
  [truncation rule unverified].
  """
  sep = getattr(tok, "sep_id", text_lib.SEP_ID)
  cls = getattr(tok, "cls_id", text_lib.CLS_ID)
  ids = [cls] + tok.pieces(expression.lower())[:max(0, max_length - 2)] + [sep]
  return text_lib.pad(ids, max_length)


# --------------------------------------------------------------------------------------
# Geometry pieces.
# --------------------------------------------------------------------------------------


def clip_box(box: Sequence[float], height: int, width: int) -> np.ndarray:
  """Corner box (x1, y1, x2, y2) float64, clipped to the image and ordered."""
  x1, y1, x2, y2 = (float(v) for v in box)
  x1, x2 = sorted((min(max(x1, 0.0), width), min(max(x2, 0.0), width)))
  y1, y2 = sorted((min(max(y1, 0.0), height), min(max(y2, 0.0), height)))
  return np.array([x1, y1, x2, y2], np.float64)


def resize(image: np.ndarray, box: np.ndarray, out_h: int, out_w: int
           ) -> tuple[np.ndarray, np.ndarray]:
  """Bilinear resize (Pillow, the torchvision default for PIL images [unverified]); the box
  is scaled by the actual per-axis ratios, so it stays on the same pixels."""
  h, w = image.shape[:2]
  if (out_h, out_w) != (h, w):
    from PIL import Image

    image = np.asarray(Image.fromarray(image).resize((out_w, out_h), Image.BILINEAR))
  scale = np.array([out_w / w, out_h / h, out_w / w, out_h / h])
  return image, box * scale


def long_side_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
  """(h, w) with the longer side = long_side and the aspect ratio kept (rounded, >= 1)."""
  ratio = long_side / max(height, width)
  return max(1, int(round(height * ratio))), max(1, int(round(width * ratio)))


def normalize(image: np.ndarray, norm: str) -> np.ndarray:
  """uint8 / float [0, 255] (H, W, 3) -> (x / 255 - mean) / std, float32."""
  if norm not in NORMS:
    raise ValueError(f"normalisation {norm!r}: one of {sorted(NORMS)}")
  mean, std = NORMS[norm]
  return ((np.asarray(image, np.float32) / 255.0 - mean) / std).astype(np.float32)


def pad(image: np.ndarray, box: np.ndarray, size: int, top: int, left: int
        ) -> tuple[np.ndarray, np.ndarray]:
  """Places a normalised (h, w, 3) image at (top, left) of a zero size x size frame."""
  h, w = image.shape[:2]
  if not (0 <= top <= size - h and 0 <= left <= size - w):
    raise ValueError(f"a {h}x{w} image does not fit at ({top}, {left}) in {size}x{size}")
  out = np.zeros((size, size, 3), np.float32)
  out[top:top + h, left:left + w] = image
  return out, box + np.array([left, top, left, top], np.float64)


def to_cxcywh(box: np.ndarray, size: int) -> np.ndarray:
  """Corner box in frame pixels -> float32 (cx, cy, w, h) / size."""
  x1, y1, x2, y2 = box
  return (np.array([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]) / size).astype(np.float32)


def crop_containing(height: int, width: int, box: np.ndarray, rng: np.random.Generator,
                    min_fraction: float = CROP_MIN) -> tuple[int, int, int, int]:
  """(top, left, h, w) of a random crop that contains the whole box [unverified rule].

  The spec only says "crop"; keeping the box whole means the target never has to be
  clipped (a clipped box would no longer describe the referred object). Each side is
  uniform between max(the box's extent, min_fraction x the image side) and the image side;
  the position is uniform among those that contain the box.
  """
  x1, y1, x2, y2 = box
  # Integer pixel bounds that contain the continuous box.
  bx1, by1 = int(math.floor(x1)), int(math.floor(y1))
  bx2, by2 = int(math.ceil(x2)), int(math.ceil(y2))
  min_w = min(width, max(bx2 - bx1, int(round(min_fraction * width)), 1))
  min_h = min(height, max(by2 - by1, int(round(min_fraction * height)), 1))
  cw = int(rng.integers(min_w, width + 1))
  ch = int(rng.integers(min_h, height + 1))
  left = int(rng.integers(max(0, bx2 - cw), min(bx1, width - cw) + 1))
  top = int(rng.integers(max(0, by2 - ch), min(by1, height - ch) + 1))
  return top, left, ch, cw


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float = JITTER
                 ) -> np.ndarray:
  """Brightness, contrast and saturation, each with a factor uniform in 1 +- strength, in
  a random order (torchvision ColorJitter semantics, hue not changed) [unverified].

  Works on float32 [0, 255]; each step clips to that range, as the uint8 originals do.
  """
  out = np.asarray(image, np.float32)
  if strength <= 0:
    return out
  factors = rng.uniform(max(0.0, 1 - strength), 1 + strength, size=3)
  luma = np.array([0.299, 0.587, 0.114], np.float32)
  for op in rng.permutation(3):
    f = np.float32(factors[op])
    if op == 0:    # brightness: blend with black
      out = out * f
    elif op == 1:  # contrast: blend with the mean grey level of the image
      out = out * f + (1 - f) * float((out @ luma).mean())
    else:          # saturation: blend with the per-pixel grey level
      out = out * f + (1 - f) * (out @ luma)[..., None]
    out = np.clip(out, 0.0, 255.0)
  return out


def hflip(image: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  w = image.shape[1]
  x1, y1, x2, y2 = box
  return image[:, ::-1], np.array([w - x2, y1, w - x1, y2], np.float64)


def train_scales(size: int) -> tuple[int, ...]:
  """Default long sides of the multi-scale resize: size - 32 i, i = 0..6, positive
  [unverified: the spec says "multi-scale" only]."""
  return tuple(s for s in (size - SCALE_STEP * i for i in range(NUM_SCALES)) if s > 0)


# --------------------------------------------------------------------------------------
# The two transforms.
# --------------------------------------------------------------------------------------


def eval_transform(image: np.ndarray, box: Sequence[float], size: int = SIZE,
                   norm: str = "imagenet") -> tuple[np.ndarray, np.ndarray]:
  """Official test geometry: (image f32 (size, size, 3), box f32 (cx, cy, w, h)/size).

  Long side -> size, normalise (`norm`; official: ImageNet statistics), pad centred
  (offset (size - h) // 2, (size - w) // 2 [rounding of odd margins unverified]).
  """
  h, w = image.shape[:2]
  corners = clip_box(box, h, w)
  image, corners = resize(image, corners, *long_side_shape(h, w, size))
  nh, nw = image.shape[:2]
  out, corners = pad(normalize(image, norm), corners, size, (size - nh) // 2, (size - nw) // 2)
  return out, to_cxcywh(corners, size)


def train_transform(image: np.ndarray, box: Sequence[float], expression: str,
                    rng: np.random.Generator, size: int = SIZE, *,
                    scales: Sequence[int] = (), crop_prob: float = CROP_PROB,
                    crop_min: float = CROP_MIN, jitter: float = JITTER,
                    flip_prob: float = FLIP_PROB, norm: str = "clip"
                    ) -> tuple[np.ndarray, np.ndarray, str]:
  """Training geometry: (image f32 (size, size, 3), box f32 (cx, cy, w, h)/size, expression).

  Order (spec 3.5 lists "multi-scale/crop, colour jitter, flip", then normalise and pad at a
  random offset): with probability `crop_prob` a crop containing the box; the long side
  resized to a scale drawn from `scales` (default `train_scales(size)`); colour jitter;
  flip with probability `flip_prob`, which also swaps left/right in the expression (the spec
  does not state the swap; without it a flipped "man on the left" would point at the wrong
  object); normalise (`norm`; official: CLIP statistics); pad at a uniform random offset.
  Every random draw is made whether or not its option is enabled, so switching one option
  off does not change the others' draws.
  """
  h, w = image.shape[:2]
  corners = clip_box(box, h, w)
  do_crop = rng.random() < crop_prob
  crop = crop_containing(h, w, corners, rng, crop_min)
  if do_crop:
    top, left, ch, cw = crop
    image = image[top:top + ch, left:left + cw]
    corners = corners - np.array([left, top, left, top], np.float64)
    h, w = ch, cw
  scales = tuple(scales) or train_scales(size)
  if max(scales) > size:
    raise ValueError(f"training scales {scales} exceed the {size} px frame")
  long_side = int(scales[int(rng.integers(len(scales)))])
  image, corners = resize(image, corners, *long_side_shape(h, w, long_side))
  image = color_jitter(image, rng, jitter)
  if rng.random() < flip_prob:
    image, corners = hflip(image, corners)
    expression = swap_left_right(expression)
  nh, nw = image.shape[:2]
  top, left = int(rng.integers(0, size - nh + 1)), int(rng.integers(0, size - nw + 1))
  out, corners = pad(normalize(image, norm), corners, size, top, left)
  return out, to_cxcywh(corners, size), expression
