"""Golden parity with the official PyTorch code, and strict official-key accounting."""

import json

import numpy as np
import pytest

from mplug2_jax.models import mplug2
from mplug2_jax.convert import parity as parity_cli
from mplug2_jax.convert.mplug2 import official, parity

CASES = ["videoqa_video", "caption_video", "caption_image"]


@pytest.mark.parametrize("case", CASES)
def test_golden_case_matches_official(shared_dir, case):
  """Every array of outputs.npz: floats within 1e-4, ids / lengths / ranks exactly."""
  case_dir = shared_dir / "golden" / "mplug2" / case
  expected = parity.load_case(case_dir)[4]
  import jax
  with jax.default_matmul_precision("highest"):
    rows = parity_cli.compare(expected, parity.run_case(case_dir))
  failures = [(name, diff, note) for name, ok, diff, note in rows if not ok]
  assert not failures
  compared = {name for name, *_ in rows}
  assert {"vision_block_outputs", "image_embeds", "decoder_logits", "loss",
          "generate_beam_ids", "generate_greedy_ids"} <= compared


@pytest.fixture(scope="module")
def golden_state(shared_dir):
  case, model_cfg, state, _, _ = parity.load_case(shared_dir / "golden" / "mplug2" / CASES[0])
  return model_cfg, state


def test_import_then_export_reproduces_the_official_tensors(golden_state):
  model_cfg, state = golden_state
  flat = official.to_flax(state, model_cfg)
  back = official.to_official(flat, model_cfg)
  assert back, "nothing exported"
  for key, value in back.items():
    assert value.dtype == state[key].dtype and value.shape == state[key].shape, key
    np.testing.assert_array_equal(value, state[key], err_msg=key)
  # Export then import is the identity on our side.
  again = official.to_flax(back, model_cfg)
  for path, value in flat.items():
    np.testing.assert_array_equal(again[path], value, err_msg=path)


def test_unexpected_key_is_named(golden_state):
  model_cfg, state = golden_state
  with pytest.raises(official.ConversionError, match="unexpected official key 'text_encoder.pooler"):
    official.to_flax({**state, "text_encoder.pooler.dense.weight": np.zeros((2, 2))}, model_cfg)


def test_missing_key_is_named(golden_state):
  model_cfg, state = golden_state
  state = dict(state)
  del state["visn_emb_norm.bias"]
  with pytest.raises(official.ConversionError, match="missing official key 'visn_emb_norm.bias'"):
    official.to_flax(state, model_cfg)


def test_wrong_shape_names_key_and_both_shapes(golden_state, shared_dir):
  model_cfg, state = golden_state
  _, _, _, inputs, _ = parity.load_case(shared_dir / "golden" / "mplug2" / CASES[0])
  batch = parity.to_batch("videoqa", inputs)
  state = dict(state)
  state["visn_emb_norm.weight"] = np.zeros(31, np.float32)
  with pytest.raises(official.ConversionError,
                     match=r"'visn_emb_norm.weight' -> 'visn_emb_norm/scale': shape \(31,\) "
                           r"but the model expects \(32,\)"):
    parity.import_params(model_cfg, state, batch)


def test_tied_copies_must_agree(golden_state):
  model_cfg, state = golden_state
  state = dict(state)
  state["text_decoder.cls.predictions.decoder.bias"] = state["text_decoder.cls.predictions.bias"] + 1
  with pytest.raises(official.ConversionError, match="tied source"):
    official.to_flax(state, model_cfg)


@pytest.mark.parametrize("size", ["base", "large"])
@pytest.mark.parametrize("task", ["caption", "videoqa"])
def test_full_size_key_accounting(shared_dir, size, task):
  """Against the official key lists: our table maps exactly the keys the task trains;
  every other key has a documented reason."""
  keys_dir = shared_dir / "spec" / "mplug2_keys"
  rows = [line.split("\t") for line in (keys_dir / f"{size}_{task}.tsv").read_text().splitlines()]
  all_keys = {key for key, _, _ in rows}
  unused = set((keys_dir / f"{size}_{task}.unused.txt").read_text().split())
  model_cfg = mplug2.model_config(size, task)
  mapped = {k for e in official.entries(model_cfg) for k in e.official}
  trained = {key for key, _, dtype in rows if key not in unused and dtype != "int64"}
  assert mapped == trained - set(official.TIED)
  for key in all_keys - mapped - set(official.TIED):
    assert official.unused_reason(key, model_cfg), key
  # Shapes of the mapped keys are consistent with our presets (a few spot checks).
  shapes = {key: tuple(json.loads(shape)) for key, shape, _ in rows}
  width = model_cfg.vision.width
  assert shapes["visual_encoder.visual.conv1.weight"] == (width, 3, 1, model_cfg.vision.patch_size,
                                                          model_cfg.vision.patch_size)
  uni = model_cfg.text.encoder_layers - model_cfg.text.universal_layers
  assert shapes[f"text_encoder.encoder.layer.{uni}.latents"] == (50, model_cfg.text.hidden_size)
