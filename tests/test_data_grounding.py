"""Visual grounding: the official geometry on hand-computed cases, the box-token scheme, a
grounding batch from a tiny built dataset, and tiny grounding train steps on it
(data/grounding.py; spec datasets.md 3.5)."""

import importlib.util
import os

import jax
import numpy as np
import pytest

from mplug2_jax.data import text as text_lib
from mplug2_jax.data import grounding as g
from mplug2_jax.data import text

from conftest import REPO

VOCABS = [str(text_lib.BERT_VOCAB_FILE)]  # shipped with the package

RED = (255, 0, 0)


def red_rectangle(h, w, box, background=(20, 30, 40)):
  """uint8 (h, w, 3): `background` with the corner box (x1, y1, x2, y2) filled red."""
  img = np.empty((h, w, 3), np.uint8)
  img[:] = background
  x1, y1, x2, y2 = box
  img[y1:y2, x1:x2] = RED
  return img


def unnormalize(x, norm):
  mean, std = g.NORMS[norm]
  return (x * std + mean) * 255.0


def corners(box_cxcywh, size):
  cx, cy, w, h = np.asarray(box_cxcywh, np.float64) * size
  return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


# ---- test geometry ------------------------------------------------------------------


def test_eval_transform_640x480_by_hand():
  # 640 x 480, box x 100..300, y 50..250 ([x, y, w, h] = [100, 50, 200, 200]).
  img = red_rectangle(480, 640, (100, 50, 300, 250))
  out, box = g.eval_transform(img, [100, 50, 300, 250])
  # Long side 640 -> 336: scale 0.525, 252 x 336, centred vertically: rows 42..293.
  # Box *0.525 = (52.5, 26.25, 157.5, 131.25), + 42 in y -> (52.5, 68.25, 157.5, 173.25).
  np.testing.assert_allclose(box * 336, [105.0, 120.75, 105.0, 105.0], atol=1e-4)
  assert out.shape == (336, 336, 3) and out.dtype == np.float32
  assert (out[:42] == 0).all() and (out[294:] == 0).all()      # padding = 0 (the mean)
  # ImageNet statistics (the official test default) on the image's own pixels.
  mean, std = g.IMAGENET_MEAN, g.IMAGENET_STD
  np.testing.assert_allclose(out[42, 300], (np.array([20, 30, 40]) / 255 - mean) / std,
                             atol=1e-5)
  np.testing.assert_allclose(out[120, 105], (np.array(RED) / 255 - mean) / std, atol=1e-5)
  np.testing.assert_allclose(out[293, 0], (np.array([20, 30, 40]) / 255 - mean) / std,
                             atol=1e-5)
  # The box tokens of this box: floor(v * 336) on exact bin edges.
  np.testing.assert_array_equal(g.quantize(box), [105, 120, 105, 105])
  # The CLIP choice changes only the normalisation.
  out_clip, box_clip = g.eval_transform(img, [100, 50, 300, 250], norm="clip")
  np.testing.assert_array_equal(box_clip, box)
  np.testing.assert_allclose(unnormalize(out_clip[42:294], "clip"),
                             unnormalize(out[42:294], "imagenet"), atol=1e-3)


def test_eval_transform_portrait_is_centred_horizontally():
  img = red_rectangle(200, 100, (10, 20, 50, 120))
  out, box = g.eval_transform(img, [10, 20, 50, 120])
  # 100 x 200 -> 168 x 336 (scale 1.68), left = (336 - 168) // 2 = 84.
  # Box *1.68 = (16.8, 33.6, 84, 201.6), + 84 in x -> (100.8, 33.6, 168, 201.6).
  np.testing.assert_allclose(box * 336, [134.4, 117.6, 67.2, 168.0], atol=1e-4)
  assert (out[:, :84] == 0).all() and (out[:, 252:] == 0).all()
  assert (out[:, 84:252] != 0).any(axis=-1).all()


def test_eval_transform_clips_boxes_to_the_image():
  img = red_rectangle(100, 100, (0, 0, 10, 10))
  _, box = g.eval_transform(img, [-20, 90, 40, 130], size=100)   # partly outside
  np.testing.assert_allclose(box * 100, [20, 95, 40, 10], atol=1e-4)


# ---- train geometry -----------------------------------------------------------------


def test_train_transform_keeps_the_box_on_the_object():
  """A red rectangle on a dark image: after crop / multi-scale / jitter / flip / random
  padding, the red pixels lie inside the transformed box and fill it."""
  rect = (100, 50, 300, 250)
  img = red_rectangle(480, 640, rect)
  flipped = 0
  for seed in range(16):
    rng = np.random.default_rng(seed)
    out, box, expr = g.train_transform(img, rect, "the red box on the left", rng)
    assert out.shape == (336, 336, 3) and (box >= 0).all() and (box <= 1).all()
    pixels = unnormalize(out, "clip")          # training uses CLIP statistics
    # Jitter scales R - G by at most 0.6^3 (255 -> 55); background 0, padding about 6.
    red = pixels[..., 0] - pixels[..., 1] > 25
    x1, y1, x2, y2 = corners(box, 336)
    ys, xs = np.nonzero(red)
    tol = 1.5  # bilinear resampling blends the edge pixels
    assert xs.min() >= x1 - tol and xs.max() + 1 <= x2 + tol, seed
    assert ys.min() >= y1 - tol and ys.max() + 1 <= y2 + tol, seed
    inner = red[int(np.ceil(y1 + tol)):int(np.floor(y2 - tol)),
                int(np.ceil(x1 + tol)):int(np.floor(x2 - tol))]
    assert inner.size and inner.mean() > 0.99, seed
    flipped += expr == "the red box on the right"
  assert 0 < flipped < 16   # the flip happens with p 0.5 and swaps left / right


def test_train_transform_without_augmentation_is_the_test_geometry_offset():
  """Crop, jitter and flip off, scale 336: the test geometry up to the random offset."""
  img = red_rectangle(480, 640, (100, 50, 300, 250))
  _, want = g.eval_transform(img, [100, 50, 300, 250], norm="clip")
  tops = set()
  for seed in range(8):
    out, box, expr = g.train_transform(img, [100, 50, 300, 250], "left", np.random.default_rng(seed),
                                       scales=(336,), crop_prob=0.0, jitter=0.0, flip_prob=0.0)
    rows = np.nonzero((out != 0).any(axis=(1, 2)))[0]
    top = int(rows[0])
    assert rows[-1] - top + 1 == 252 and 0 <= top <= 84 and expr == "left"
    np.testing.assert_allclose(box, want + np.float32([0, (top - 42) / 336, 0, 0]), atol=1e-6)
    tops.add(top)
  assert len(tops) > 1      # random vertical offset (the width fills the frame)


def test_train_flip_mirrors_the_box_and_swaps_the_words():
  img = red_rectangle(480, 640, (100, 50, 300, 250))
  out, box, expr = g.train_transform(img, [100, 50, 300, 250], "man on the left, rightmost",
                                     np.random.default_rng(0), scales=(336,), crop_prob=0.0,
                                     jitter=0.0, flip_prob=1.0)
  assert expr == "man on the right, leftmost"
  assert box[0] * 336 == pytest.approx(336 - 105, abs=1e-4)   # cx mirrored
  assert box[2] * 336 == pytest.approx(105, abs=1e-4)


def test_crop_always_contains_the_box():
  rng = np.random.default_rng(0)
  for _ in range(500):
    h, w = rng.integers(1, 60, 2)
    x = np.sort(rng.uniform(0, w, 2))
    y = np.sort(rng.uniform(0, h, 2))
    box = np.array([x[0], y[0], x[1], y[1]])
    top, left, ch, cw = g.crop_containing(h, w, box, rng)
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
    assert left <= box[0] and box[2] <= left + cw and top <= box[1] and box[3] <= top + ch


def test_swap_left_right_whole_words_only():
  assert g.swap_left_right("left guy right of the bright copyright sign, leftmost") == \
      "right guy left of the bright copyright sign, rightmost"
  assert g.swap_left_right("leftover") == "leftover"


# ---- the token scheme ---------------------------------------------------------------


def test_quantize_clamps_and_floors():
  np.testing.assert_array_equal(g.quantize([-0.2, 1.5, 1.0, 0.0]), [0, 336, 336, 0])
  np.testing.assert_array_equal(g.quantize([0.5, 0.9999, 1 / 336 - 1e-3, 2.5 / 336]),
                                [168, 335, 0, 2])
  q = np.arange(g.NUM_COORD_TOKENS)
  # float32 arithmetic as in the official torch code: of the 337 exact edges k / 336, 14
  # round to just below k (float32(57 / 336) * 336 = 56.999996) and land one bin lower.
  assert np.float32(np.float32(57) / np.float32(336)) * np.float32(336) < 57
  got = g.quantize(np.float32(q) / np.float32(336))
  low = [57, 61, 93, 101, 114, 122, 181, 186, 202, 207, 223, 228, 244, 249]
  np.testing.assert_array_equal(got, np.where(np.isin(q, low), q - 1, q))
  assert g.coordinate_token(0) == "[unused340]" and g.coordinate_token(336) == "[unused676]"
  with pytest.raises(ValueError):
    g.coordinate_token(337)


def test_token_ids_and_answer_rows():
  tok = text.WordPieceTokenizer(VOCABS[0])
  prefix, coords = g.token_ids(tok)
  # BERT uncased: [unused0] = 1, [unused1..98] = 2..99, [unused99..] = 104.. (after specials).
  assert prefix == 344 and coords[0] == 345 and coords[-1] == 681 and len(coords) == 337
  rows = g.answer_targets(np.float32([105, 120.75, 105, 400]) / 336, prefix, coords)
  np.testing.assert_array_equal(rows["answer_ids"], [[344, 450, 465, 450, 681]])
  np.testing.assert_array_equal(rows["answer_labels"], [[-100, 450, 465, 450, 681]])
  np.testing.assert_array_equal(rows["answer_mask"], [[1] * 5])
  # The expression: lower-cased, [CLS] pieces [SEP], the [SEP] kept when truncating.
  ids, mask = g.encode_expression(tok, "The LEFT Man", 8)
  assert tok.convert_ids_to_tokens(ids[:5]) == ["[CLS]", "the", "left", "man", "[SEP]"]
  np.testing.assert_array_equal(mask, [1] * 5 + [0] * 3)
  ids, mask = g.encode_expression(tok, "one two three four five", 4)
  assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "one", "two", "[SEP]"]


# ---- pipeline and training on a tiny built dataset ------------------------------------


@pytest.fixture(scope="module")
def refcoco(tmp_path_factory):
  """A RefCOCO-style split file ([x, y, w, h] boxes) of 8 small images, built twice:
  train and val."""
  torch = pytest.importorskip("torch")
  from PIL import Image

  from mplug2_jax.data import build

  root = tmp_path_factory.mktemp("refcoco")
  (root / "images").mkdir()
  anns = []
  for i in range(8):
    w, h = (40, 30) if i % 2 == 0 else (30, 40)
    x, y = (4, 5) if i < 4 else (16, 12)
    Image.fromarray(red_rectangle(h, w, (x, y, x + 10, y + 10))).save(
        root / "images" / f"COCO_train2014_{i:012d}.jpg", quality=95)
    side = "left" if i < 4 else "right"
    anns.append((f"COCO_train2014_{i:012d}.jpg", f"ann{i}", [x, y, 10, 10],
                 f"The red square on the {side}", [f"ann{i}"]))
  torch.save(anns, root / "unc_train.pth")
  path = build.build("grounding", str(root / "built"),
                     {"train": [str(root / "unc_train.pth")], "val": [str(root / "unc_train.pth")]},
                     str(root / "images"), max_bad_fraction=0.0, log=lambda *_: None)
  return path


def load_recipe(arg):
  spec = importlib.util.spec_from_file_location("grounding_recipe",
                                                os.path.join(REPO, "configs", "grounding.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def grounding_iterator(path, split, batch=4):
  from mplug2_jax.data import pipeline

  config = load_recipe(f"tiny,data={path}")
  config.data.vocab_file = VOCABS[0]
  return config, pipeline.make_iterator(config.data, split=split, batch_size=batch,
                                        model_cfg=config.model)


def test_grounding_batches_carry_the_box_as_answer_tokens(refcoco):
  tok = text.WordPieceTokenizer(VOCABS[0])
  prefix, coords = g.token_ids(tok)
  config, it = grounding_iterator(refcoco, "val")
  boxes, words = {}, {}
  for _ in range(2):   # the whole split: 8 records
    b = next(it)
    assert b["video"].shape == (4, 1, 32, 32, 3) and b["video"].dtype == np.float32
    assert b["text_ids"].shape == b["text_mask"].shape == (4, 20)
    assert b["answer_ids"].shape == b["answer_mask"].shape == b["answer_labels"].shape == (4, 5)
    np.testing.assert_array_equal(b["answer_question_index"], [0, 1, 2, 3])
    np.testing.assert_array_equal(b["answer_weights"], [1, 1, 1, 1])
    assert "labels" not in b and "image_ids" not in b
    # The answer rows: [unused339] + the tokens of this batch's boxes; the prefix is no target.
    np.testing.assert_array_equal(b["answer_ids"][:, 0], prefix)
    np.testing.assert_array_equal(b["answer_ids"][:, 1:], coords[g.quantize(b["boxes"])])
    np.testing.assert_array_equal(b["answer_labels"][:, 1:], b["answer_ids"][:, 1:])
    assert (b["answer_labels"][:, 0] == -100).all() and (b["answer_mask"] == 1).all()
    # tfds stores records in its own order: key them by id ("file#index").
    for row, m in enumerate(it.last_meta):
      i = int(m["id"].split("#")[1])
      boxes[i] = b["boxes"][row] * 32
      words[i] = tok.convert_ids_to_tokens([t for t in b["text_ids"][row] if t])
  assert sorted(boxes) == list(range(8))
  # i = 0: 40 x 30, [x, y, w, h] = [4, 5, 10, 10] -> corners (4, 5, 14, 15); long side
  #   40 -> 32 (x0.8): 32 x 24 centred at top 4 -> (3.2, 8, 11.2, 16) -> (7.2, 12, 8, 8).
  # i = 1: 30 x 40, same box: 24 x 32 centred at left 4 -> (7.2, 4, 15.2, 12)
  #   -> (11.2, 8, 8, 8).
  # i = 4: 40 x 30, [16, 12, 10, 10] -> (12.8, 9.6 + 4, 20.8, 17.6 + 4) -> (16.8, 17.6, 8, 8).
  np.testing.assert_allclose(boxes[0], [7.2, 12, 8, 8], atol=1e-4)
  np.testing.assert_allclose(boxes[1], [11.2, 8, 8, 8], atol=1e-4)
  np.testing.assert_allclose(boxes[4], [16.8, 17.6, 8, 8], atol=1e-4)
  for i in range(8):   # the same rule for all: x0.8, offset 4 on the short side
    x, y = (4, 5) if i < 4 else (16, 12)
    dx, dy = (0, 4) if i % 2 == 0 else (4, 0)
    np.testing.assert_allclose(boxes[i], [(x + 5) * 0.8 + dx, (y + 5) * 0.8 + dy, 8, 8],
                               atol=1e-4)
    side = "left" if i < 4 else "right"
    assert words[i] == ["[CLS]", "the", "red", "square", "on", "the", side, "[SEP]"]
  # Training batches: augmented, with targets that follow the augmented box.
  _, it = grounding_iterator(refcoco, "train")
  b = next(it)
  assert b["video"].shape == (4, 1, 32, 32, 3)
  np.testing.assert_array_equal(b["answer_ids"][:, 1:], coords[g.quantize(b["boxes"])])


def test_tiny_grounding_training_steps_reduce_the_loss(refcoco):
  """configs/grounding.py:tiny through the real train step on one pipeline batch: finite
  losses that decrease (the decoder learns the box tokens of that batch)."""
  from mplug2_jax import sharding
  from mplug2_jax.train import state as state_lib, step as step_lib

  config, it = grounding_iterator(refcoco, "train")
  batch = {k: v for k, v in next(it).items()}
  config.mesh.shape = (1, 1, 1)
  config.batch_size = 4
  # Fewer layers than the tiny preset: compiling dominates this test (about 2x faster).
  t = config.model.text
  config.model.vision.layers = t.fusion_layers = t.fusion_layers_built = t.decoder_layers = 1
  t.encoder_layers = 2
  t.dropout = t.attention_dropout = 0.0
  config.optimizer.update(schedule="constant", lr=1e-3, lr_mults=())
  mesh = sharding.make_mesh(config, jax.devices()[:1])
  setup = state_lib.TrainSetup(config, mesh, batch)
  fn = step_lib.JittedStep(setup)
  state = setup.init()
  losses = []
  for _ in range(4):
    state, metrics = fn(state, batch)
    losses.append(float(metrics["loss"]))
    assert bool(metrics["finite"]) and set(metrics) >= {"loss", "loss/box"}
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
