"""mPLUG-Owl2: golden parity, the 7B parameter count, conversion both ways, batched
generation against per-sample generation, config checks and the chat CLI's batch mode.

Everything runs on the tiny configuration (the golden `tiny_a`) except the 7B count,
which is `jax.eval_shape` only. Model arrays are compiled once per shape in module-scoped
fixtures.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mplug2_jax import config_lib, param_store, sharding
from mplug2_jax.convert import checkpoints
from mplug2_jax.convert import parity as parity_cli
from mplug2_jax.models import owl2
from mplug2_jax.models.owl2 import generation, model as model_lib
from mplug2_jax.tokens import IMAGE_TOKEN_INDEX

from conftest import SHARED

GOLDEN = SHARED / "golden" / "owl2"
PUBLIC_CASES = ("batch2_padded_multi_image", "preprocess_pad", "single_image", "text_only")
CASES = sorted(p.name for p in GOLDEN.iterdir() if p.is_dir()) if GOLDEN.is_dir() else PUBLIC_CASES


# ---- golden parity (the `python -m mplug2_jax.convert.parity` code path) ----------------


@pytest.fixture(scope="module")
def golden_dir():
  if not GOLDEN.is_dir():
    pytest.skip(f"{GOLDEN} is absent (CI clones shared/ beside the repository)")
  return GOLDEN


@pytest.fixture
def restore_precision():
  """`check_cases` sets the global matmul precision as the CLI does; put it back after."""
  before = jax.config.jax_default_matmul_precision
  yield
  jax.config.update("jax_default_matmul_precision", before)


@pytest.mark.parametrize("case", CASES)
def test_golden_case_passes_the_parity_command(golden_dir, case, capsys, restore_precision):
  """`python -m mplug2_jax.convert.parity CASE` (its `check_cases`): every array of
  outputs.npz within the golden README's 1e-4, integer arrays exactly."""
  case_dir = golden_dir / case
  assert parity_cli.parity_module(case_dir).__name__ == "mplug2_jax.convert.owl2.parity"
  passed, total, worst = parity_cli.check_cases([case_dir])
  lines = capsys.readouterr().out.splitlines()
  rows = {line.split()[1]: line.split()[0] for line in lines[1:]}
  assert passed == total == len(np.load(case_dir / "outputs.npz").files), lines
  assert set(rows.values()) == {"ok"} and worst <= parity_cli.TOLERANCE
  if case.startswith("preprocess"):
    assert set(rows) == {"pixel_values"}
  else:
    assert {"logits", "loss", "gen_tokens", "llm_hidden_states"} <= set(rows)
    if "pixel_values" in np.load(case_dir / "inputs.npz"):
      assert {"vision_last_hidden_state", "abstractor_output"} <= set(rows)


def test_public_cases_are_all_tested(golden_dir):
  assert set(PUBLIC_CASES) <= set(CASES)


# ---- configs ------------------------------------------------------------------------------


def _abstract(model_cfg) -> dict:
  return sharding.flat(sharding.unboxed(sharding.abstract_params(
      owl2.build(model_cfg), owl2.init_batch(model_cfg))))


def test_7b_parameter_count_is_exact():
  """owl2.md section 9: 8,197,859,328 in all; the text-only path (no ViT, abstractor or
  image branch of the modality-adaptive module) is LLaMA-2-7B."""
  m = owl2.model_config("7b")
  shapes = _abstract(m)
  size = lambda s: int(np.prod(s.shape))
  assert sum(size(s) for s in shapes.values()) == 8_197_859_328
  multiway = ("llm/layers/attn/key/", "llm/layers/attn/value/", "llm/layers/input_norm/",
              "llm/layers/post_norm/")
  text = 0
  for path, s in shapes.items():
    if path.startswith(("vision/", "abstractor/")):
      continue
    if path.startswith(multiway):
      assert s.shape[1] == 2, path   # (layers, modality, ...)
      text += size(s) // 2
    else:
      text += size(s)
  assert text == 6_738_415_616


def test_abstractor_init_std_sets_every_abstractor_kernel_and_only_those():
  """`model.abstractor.init_std` (official 0.02, the default, also for model configs
  written without the key) is the normal std of the abstractor's kernels; the rest of
  the model keeps the LLaMA init."""
  def kernel_stds(m):
    variables = jax.jit(owl2.build(m).init)(jax.random.key(0), owl2.init_batch(m))
    flat = param_store.flatten(sharding.unboxed(variables["params"]))
    return {k: float(np.std(v)) for k, v in flat.items() if k.endswith("kernel")}

  m = owl2.model_config("tiny")
  wide = m.copy_and_resolve_references()
  wide.abstractor.init_std = 0.2
  legacy = m.copy_and_resolve_references()
  del legacy.abstractor["init_std"]
  default, scaled, old = kernel_stds(m), kernel_stds(wide), kernel_stds(legacy)
  assert old == default
  abstractor = [k for k in default if k.startswith("abstractor/")]
  assert len(abstractor) == 8  # q, k, v, out, gate, wi, wo, visual_fc
  for k in default:
    if k.startswith("abstractor/"):
      assert 0.015 < default[k] < 0.025 and 0.15 < scaled[k] < 0.25, (k, default[k], scaled[k])
    else:
      assert scaled[k] == default[k], k


def test_image_size_must_fit_the_positional_tables():
  m = owl2.model_config("tiny")
  owl2.validate(m)
  m.image_size = 84
  with pytest.raises(config_lib.ConfigError) as e:
    owl2.validate(m)
  message = str(e.value)
  assert "\n" not in message and message.startswith("config.model.image_size=84")
  assert "56" in message


def test_data_image_size_must_be_the_models():
  from mplug2_jax import experiment

  config = experiment.base_config("tiny", "instruct", family="owl2")
  experiment.validate(config, training=False)
  config.data.image_size = 224
  with pytest.raises(config_lib.ConfigError, match=r"^config.data.image_size=224: must be 0 "
                                                   r"or model.image_size=56"):
    experiment.validate(config, training=False)


def test_images_of_another_size_fail_before_compute():
  m = owl2.model_config("tiny")
  model = owl2.build(m)
  with pytest.raises(ValueError, match=r"84x84 pixels, but the model is for 56x56"):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x,
                                        method=model_lib.Owl2.encode_images),
                   jax.ShapeDtypeStruct((1, 84, 84, 3), jnp.float32))


# ---- tiny random weights --------------------------------------------------------------------


def _fan_in(path: str, shape: tuple) -> int:
  if path.endswith(("query/kernel", "key/kernel", "value/kernel")):
    return shape[-3]                     # (..., in, heads, head_dim)
  if path.endswith("out/kernel"):
    return shape[-3] * shape[-2]         # (..., heads, head_dim, out)
  if "patch_embed" in path:
    return int(np.prod(shape[:-1]))
  return shape[-2]                       # (..., in, out)


def random_flat(model_cfg, seed: int = 0) -> dict[str, np.ndarray]:
  """Random parameters with O(1) activations and logits (top-2 margins far above float
  noise, so greedy tokens are a sound comparison)."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, s in sorted(_abstract(model_cfg).items()):
    if path.endswith("/scale"):
      value = 1 + 0.1 * rng.standard_normal(s.shape)
    elif path.endswith("/bias"):
      value = 0.1 * rng.standard_normal(s.shape)
    elif path.endswith("/kernel"):
      value = rng.standard_normal(s.shape) / np.sqrt(_fan_in(path, s.shape))
    else:  # embeddings, positions, class token, queries, end token
      value = 0.5 * rng.standard_normal(s.shape)
    out[path] = value.astype(np.float32)
  return out


@pytest.fixture(scope="module")
def tiny():
  m = owl2.model_config("tiny")
  owl2.validate(m)
  flat = random_flat(m)
  return m, flat, jax.tree.map(jnp.asarray, param_store.nest(flat))


# ---- batched generation == per-sample generation --------------------------------------------

STEPS = 6
# (length, positions of the image placeholders): image first, last, adjacent, separated,
# none; the length goes with the image count, so the per-sample references compile for
# three shapes only.
SAMPLES = [(5, ()), (7, (0,)), (7, (6,)), (9, (3, 4)), (9, (0, 8)), (5, ())]
LENGTH, SLOTS, ROWS = 11, 2, 4


def sample_arrays(m, size: int):
  rng = np.random.default_rng(1)
  out = []
  for length, where in SAMPLES:
    ids = rng.integers(3, m.llm.vocab_size, length)
    ids[0 if 0 not in where else 1] = m.llm.bos_token_id
    ids[list(where)] = IMAGE_TOKEN_INDEX
    images = rng.standard_normal((len(where), size, size, 3)).astype(np.float32)
    out.append((ids.astype(np.int32), images))
  return out


@pytest.fixture(scope="module")
def references(tiny):
  """Each sample generated alone, unpadded (greedy, no stop): tokens and logits."""
  m, _, params = tiny
  cached = model_lib.build(m, use_cache=True)
  run = jax.jit(lambda p, ids, mask, images, image_mask: generation.generate(
      cached, p, ids, mask, images, image_mask, max_new_tokens=STEPS, return_logits=True))
  samples = sample_arrays(m, m.image_size)
  refs = []
  for ids, images in samples:
    n = len(images)
    result = run(params, ids[None], np.ones((1, len(ids)), np.int32),
                 images[None] if n else None, np.ones((1, n), np.int32) if n else None)
    refs.append((np.asarray(result.tokens[0]), np.asarray(result.logits[0])))
  top2 = np.sort(np.concatenate([lg for _, lg in refs]), axis=-1)[:, -2:]
  assert np.min(top2[:, 1] - top2[:, 0]) > 1e-3, "random weights give near-ties"
  return samples, refs


def make_batch(m, samples, rows, sides, length=LENGTH, slots=SLOTS):
  """Rows of `samples` padded to `length` on their side ("left" / "right")."""
  b = len(rows)
  size = m.image_size
  batch = {"input_ids": np.full((b, length), m.llm.pad_token_id, np.int32),
           "attention_mask": np.zeros((b, length), np.int32),
           "images": np.zeros((b, slots, size, size, 3), np.float32),
           "image_mask": np.zeros((b, slots), np.int32)}
  for r, (s, side) in enumerate(zip(rows, sides)):
    ids, images = samples[s]
    start = length - len(ids) if side == "left" else 0
    batch["input_ids"][r, start:start + len(ids)] = ids
    batch["attention_mask"][r, start:start + len(ids)] = 1
    batch["images"][r, :len(images)] = images
    batch["image_mask"][r, :len(images)] = 1
  owl2.check_images(batch)
  return batch


def mixes(count: int, seed: int):
  rng = np.random.default_rng(seed)
  for _ in range(count):
    rows = rng.choice(len(SAMPLES), ROWS, replace=True)
    sides = rng.choice(["left", "right"], ROWS) if rng.random() < 0.5 else (
        [rng.choice(["left", "right"])] * ROWS)
    yield [int(r) for r in rows], [str(s) for s in sides]


def expected_stop(tokens: np.ndarray, limit: int, eos: int, stops: list[list[int]]) -> int:
  """How many of a reference's tokens a row keeps: up to its limit, its first eos, or the
  end of the first stop sequence it completes."""
  for n in range(1, limit + 1):
    if tokens[n - 1] == eos or any(n >= len(q) and list(tokens[n - len(q):n]) == q
                                   for q in stops):
      return n
  return limit


def test_batched_greedy_generation_equals_per_sample(tiny, references):
  """Mixed prompt lengths, 0/1/2 images, left / right / mixed padding, per-row limits, a
  stop token and stop sequences: every row generates what its prompt generates alone,
  then stops."""
  m, _, params = tiny
  samples, refs = references
  eos = int(refs[0][0][2])  # tokens some references produce: rows stop on them
  stops = [[int(t) for t in refs[3][0][1:3]], [int(refs[4][0][3])]]
  cached = model_lib.build(m, use_cache=True)
  run = jax.jit(lambda p, b: generation.generate(
      cached, p, b["input_ids"], b["attention_mask"], b["images"], b["image_mask"],
      max_new_tokens=STEPS, eos_id=eos, max_new=b["max_new"],
      stop_sequences=b["stop_sequences"], return_logits=True))
  rng = np.random.default_rng(2)
  stopped = 0
  for rows, sides in mixes(8, seed=3):
    batch = make_batch(m, samples, rows, sides)
    batch["max_new"] = rng.integers(2, STEPS + 1, ROWS).astype(np.int32)
    batch["stop_sequences"] = generation.stop_sequence_array(stops)
    result = run(params, batch)
    tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
    for r, s in enumerate(rows):
      want, want_logits = refs[s]
      limit = int(batch["max_new"][r])
      n = expected_stop(want, limit, eos, stops)
      stopped += n < limit
      where = f"mix {rows} {sides}, row {r}"
      assert lengths[r] == n, where
      np.testing.assert_array_equal(tokens[r, :n], want[:n], err_msg=where)
      assert (tokens[r, n:] == m.llm.pad_token_id).all(), where
      np.testing.assert_allclose(np.asarray(result.logits)[r, :n], want_logits[:n],
                                 atol=1e-4, err_msg=where)
  assert stopped, "no row met a stop rule"


def test_batched_generation_without_images_and_sampling_is_batch_independent(tiny,
                                                                               references):
  """A text-only batch (no image arrays: the vision tower is not run) matches the
  references; sampled rows (temperature, top-k, top-p, per-row keys) do not depend on the
  batch they are in."""
  m, _, params = tiny
  samples, refs = references
  cached = model_lib.build(m, use_cache=True)
  text_rows = [i for i, (_, where) in enumerate(SAMPLES) if not where]
  batch = make_batch(m, samples, text_rows, ["left", "right"])
  result = jax.jit(lambda p, ids, mask: generation.generate(
      cached, p, ids, mask, max_new_tokens=STEPS))(
          params, batch["input_ids"], batch["attention_mask"])
  for r, s in enumerate(text_rows):
    np.testing.assert_array_equal(np.asarray(result.tokens[r]), refs[s][0])

  sample = jax.jit(lambda p, b, keys: generation.generate(
      cached, p, b["input_ids"], b["attention_mask"], b["images"], b["image_mask"],
      max_new_tokens=STEPS, temperature=1.5, top_k=50, top_p=0.95, rngs=keys).tokens)
  base = jax.random.key(7, impl="threefry2x32")  # vmap-invariant bits (conftest: rbg)
  seen: dict[int, np.ndarray] = {}
  for rows, sides in mixes(3, seed=5):
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(np.asarray(rows))
    tokens = np.asarray(sample(params, make_batch(m, samples, rows, sides), keys))
    for r, s in enumerate(rows):
      if s in seen:
        np.testing.assert_array_equal(tokens[r], seen[s], err_msg=f"sample {s}")
      seen[s] = tokens[r]
  assert any(not np.array_equal(seen[s], refs[s][0]) for s in seen), "sampling looks greedy"


def test_sampling_respects_top_k_and_top_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 256))
  keys = jax.random.split(jax.random.key(0), 256)
  pick = jax.jit(lambda lg, k, top_k, top_p: generation.choose_tokens(
      lg, k, temperature=1.0, top_k=top_k, top_p=top_p), static_argnums=(2, 3))
  assert set(np.asarray(pick(logits, keys, 2, 1.0)).tolist()) == {0, 1}
  assert set(np.asarray(pick(logits, keys, 0, 0.7)).tolist()) == {0, 1}
  assert set(np.asarray(pick(logits, keys, 0, 1.0)).tolist()) == {0, 1, 2, 3}


# ---- conversion both ways -------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
  """The tiny random parameters exported as one safetensors file and as an HF directory."""
  from mplug2_jax.convert import owl2 as conversion

  m, flat, _ = tiny
  root = tmp_path_factory.mktemp("owl2_export")
  conversion.write_official(flat, m, str(root / "single.safetensors"))
  conversion.write_official(flat, m, str(root / "hf"))
  return root


def _expected(m):
  return {k: v.shape for k, v in _abstract(m).items()}


@pytest.mark.parametrize("layout", ["single.safetensors", "hf"])
def test_export_import_round_trip_is_bit_identical(tiny, exported, layout):
  from mplug2_jax.convert import owl2 as conversion
  from mplug2_jax.convert.owl2 import official

  m, flat, _ = tiny
  state = checkpoints.open_state_dict(exported / layout)
  assert set(state) == set(official.layout(m))  # every parameter and buffer key
  if layout == "hf":
    index = json.loads((exported / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == m.llm.layers + 1
    assert index["weight_map"]["model.layers.1.mlp.up_proj.weight"].startswith("model-00002-")
    config = json.loads((exported / "hf" / "config.json").read_text())
    assert official.architecture_mismatch(official.model_config_from_official(config), m) is None
  back, notes = conversion.import_official(state, m, _expected(m))
  assert any("buffers present and equal" in n for n in notes)
  assert set(back) == set(flat)
  for path, value in flat.items():
    assert back[path].dtype == value.dtype, path
    np.testing.assert_array_equal(back[path], value, err_msg=path)
  # Official -> ours -> official reproduces every tensor of the file.
  again = official.to_official(back, m)
  for key in state:
    np.testing.assert_array_equal(again[key], state[key], err_msg=key)


def test_buffers_are_checked_when_present_never_required(tiny, exported):
  from mplug2_jax.convert.owl2 import official

  m, flat, _ = tiny
  state = dict(checkpoints.open_state_dict(exported / "single.safetensors"))
  buffers = official.buffers(m)
  assert set(buffers) <= set(state) and len(buffers) == m.llm.layers + 2 * m.abstractor.layers
  without = {k: v for k, v in state.items() if k not in buffers}
  back = official.to_flax(without, m, _expected(m))
  for path, value in flat.items():
    np.testing.assert_array_equal(back[path], value, err_msg=path)
  key = "model.visual_abstractor.encoder.layers.1.crossattention.attention.k_pos_embed"
  with pytest.raises(official.ConversionError, match=f"buffer '{key}' differs"):
    official.to_flax({**state, key: state[key] + 0.5}, m)
  key = "model.layers.0.self_attn.rotary_emb.inv_freq"
  with pytest.raises(official.ConversionError, match=rf"buffer '{key}' has shape \(3,\)"):
    official.to_flax({**state, key: state[key][:3]}, m)


def test_strict_import_names_the_key_and_the_shapes(tiny, exported):
  from mplug2_jax.convert.owl2 import official

  m, _, _ = tiny
  state = dict(checkpoints.open_state_dict(exported / "single.safetensors"))
  key = "model.layers.1.self_attn.k_proj.multiway.1.weight"
  missing = {k: v for k, v in state.items() if k != key}
  with pytest.raises(official.ConversionError, match=rf"missing official key '{key}' \(40, 40\)"):
    official.to_flax(missing, m)
  with pytest.raises(official.ConversionError,
                     match=r"unexpected official key 'model.layers.3.mlp.up_proj.weight' "
                           r"\(96, 40\)"):
    official.to_flax({**state, "model.layers.3.mlp.up_proj.weight": np.zeros((96, 40))}, m)
  key = "model.visual_abstractor.encoder.layers.0.crossattention.output.mlp.w1.weight"
  with pytest.raises(official.ConversionError,
                     match=rf"official key '{key}' has shape \(47, 32\) but config.model "
                           rf"implies \(48, 32\)"):
    official.to_flax({**state, key: np.zeros((47, 32), np.float32)}, m)


def test_import_refuses_a_checkpoint_of_another_architecture(tiny, exported, tmp_path):
  import shutil

  from mplug2_jax.convert import owl2 as conversion
  from mplug2_jax.convert.owl2 import official

  m, _, _ = tiny
  shutil.copytree(exported / "hf", tmp_path / "hf")
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  config["rms_norm_eps"] = 1e-5
  (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
  with pytest.raises(official.ConversionError, match=r"model.llm.rms_norm_eps: 1e-06 vs 1e-05"):
    conversion.import_official(checkpoints.open_state_dict(tmp_path / "hf"), m, _expected(m))


# ---- chat CLI, batch mode -------------------------------------------------------------------


def test_chat_batch_mode_answers_every_prompt(tiny, tmp_path, capsys):
  from PIL import Image

  from mplug2_jax import chat
  from mplug2_jax.data import spm

  m, _, params = tiny
  words = "what is in the image describe colour red green circle square a picture".split()
  rng = np.random.default_rng(0)
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(" ".join(rng.choice(words, 8)) + " USER: ASSISTANT:"
                              for _ in range(400)) + "\n")
  checkpoint = tmp_path / "ckpt"
  param_store.save_params(checkpoint, jax.device_get(params), m)
  spm.train([str(corpus)], str(checkpoint / "tokenizer"), 300, model_type="bpe",
            layout="llama")
  for i, shape in enumerate([(30, 40, 3), (50, 20, 3)]):
    Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8)).save(tmp_path / f"{i}.png")
  prompts = [{"id": "a", "prompt": "what is in the image", "image": str(tmp_path / "0.png")},
             {"id": "b", "prompt": "describe a red circle"},
             {"id": "c", "prompt": "colour", "image": [str(tmp_path / "0.png"),
                                                     str(tmp_path / "1.png")]}]
  source, output = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
  source.write_text("".join(json.dumps(p) + "\n" for p in prompts))
  repo = pathlib.Path(__file__).resolve().parents[1]
  chat.main(["--checkpoint", str(checkpoint), "--tokenizer",
             str(checkpoint / "tokenizer.model"), "--batch", str(source), "--output",
             str(output), "--config", f"{repo}/configs/owl2_chat.py:mode=vqa,max_new_tokens=4"])
  answers = [json.loads(line) for line in output.read_text().splitlines()]
  assert [a["id"] for a in answers] == ["a", "b", "c"]
  assert [a["prompt"] for a in answers] == [p["prompt"] for p in prompts]
  assert all(isinstance(a["answer"], str) for a in answers)
  # One question (the interactive path's first turn, with the template and image).
  chat.main(["--checkpoint", str(checkpoint), "--image", str(tmp_path / "1.png"),
             "--prompt", "describe the image", "--config",
             f"{repo}/configs/owl2_chat.py:mode=caption,max_new_tokens=3"])
  assert capsys.readouterr().out.startswith("ASSISTANT: ")
  # A missing image is named, in one line, before any compute.
  source.write_text(json.dumps({"prompt": "x", "image": str(tmp_path / "nope.png")}) + "\n")
  with pytest.raises(SystemExit) as e:
    chat.main(["--checkpoint", str(checkpoint), "--batch", str(source), "--output",
               str(output)])
  assert e.value.code == 2


def test_generation_benchmark_imports_without_input_pipeline_packages():
  """`benchmark/owl2_generation.py` needs only jax and the model packages."""
  import subprocess
  import sys

  code = ("import sys\n"
          "for name in ('grain', 'tensorflow_datasets', 'av', 'array_record'):\n"
          "  sys.modules[name] = None\n"
          "from mplug2_jax.benchmark import owl2_generation as g\n"
          "m = g.model_config('tiny', 'float32')\n"
          "b = g.prompt_batch(m, 2, 8, 1)\n"
          "assert b['images'].shape == (2, 1, 56, 56, 3)\n"
          "assert (b['input_ids'][:, 1] == -200).all()\n")
  repo = pathlib.Path(__file__).resolve().parents[1]
  subprocess.run([sys.executable, "-c", code], check=True, cwd=repo,
                 env={**os.environ, "PYTHONPATH": str(repo)})


def test_llama_init_fills_the_text_branch_and_copies_it_to_the_image_branch(tiny, exported):
  """init-pretrained --llama: an HF LLaMA state dict (here the text branch of the tiny
  export, renamed) -> LLM leaves; multiway.1 = multiway.0; ViT and abstractor stay fresh."""
  import re

  from mplug2_jax.convert.owl2 import pretrained

  m, flat, _ = tiny
  official = checkpoints.open_state_dict(exported / "single.safetensors")
  llama = {}
  for key in official:
    if not key.startswith(("model.layers.", "model.embed_tokens", "model.norm", "lm_head")):
      continue
    if ".multiway.1." in key:
      continue
    llama[re.sub(r"\.multiway\.0", "", key)] = official[key]
  fresh = random_flat(m, seed=1)
  params, notes = pretrained.initialise(fresh, m, llama=llama)
  assert any("copy of the text branch" in n for n in notes)
  for path, value in params.items():
    if path.startswith(("vision/", "abstractor/")):
      np.testing.assert_array_equal(value, fresh[path], err_msg=path)
    elif path.startswith(("llm/layers/attn/key", "llm/layers/attn/value", "llm/layers/input_norm",
                          "llm/layers/post_norm")):
      np.testing.assert_array_equal(value[:, 0], flat[path][:, 0], err_msg=path)
      np.testing.assert_array_equal(value[:, 1], flat[path][:, 0], err_msg=path)
    else:
      np.testing.assert_array_equal(value, flat[path], err_msg=path)
  with pytest.raises(pretrained.ConversionError, match="unexpected LLaMA key 'model.extra'"):
    pretrained.initialise(fresh, m, llama={**llama, "model.extra": np.zeros(3)})


def test_grouped_query_attention_equals_repeated_key_value_heads():
  """num_kv_heads < num_heads (official bug 5: a crash there) is the MHA model whose
  key/value heads are repeated over each group; its conversion round-trips too."""
  from mplug2_jax.convert.owl2 import official

  m = owl2.model_config("tiny")
  m.llm.num_kv_heads = 1
  owl2.validate(m)
  gqa = random_flat(m, seed=4)
  mha_cfg = owl2.model_config("tiny")
  mha = dict(gqa)
  for leaf in ("llm/layers/attn/key/kernel", "llm/layers/attn/value/kernel"):
    mha[leaf] = np.repeat(gqa[leaf], mha_cfg.llm.num_heads, axis=-2)  # (.., D, kv, hd)
  rng = np.random.default_rng(5)
  batch = {"input_ids": rng.integers(3, 1000, (2, 7)).astype(np.int32),
           "attention_mask": np.ones((2, 7), np.int32)}
  batch["attention_mask"][1, 5:] = 0
  logits = [np.asarray(jax.jit(owl2.build(c).apply)(
      {"params": param_store.nest(p)}, batch)[0]["logits"]) for c, p in ((m, gqa),
                                                                        (mha_cfg, mha))]
  np.testing.assert_allclose(logits[0], logits[1], atol=1e-5)
  back = official.to_flax(official.to_official(gqa, m), m, _expected(m))
  for path, value in gqa.items():
    np.testing.assert_array_equal(back[path], value, err_msg=path)


def test_chat_prompt_is_the_official_template_with_history():
  """`mplug_owl2` (owl2.md section 6): no system prompt, the image markers before the first
  question, every earlier turn kept."""
  import types

  from mplug2_jax import chat
  from mplug2_jax.data import instruction

  stub = types.SimpleNamespace(settings=chat.default_settings(), instruction=instruction)
  assert chat.Chat.prompt(stub, [("Describe the image.", "")], 1) == (
      "USER: <|image|>Describe the image. ASSISTANT:")
  assert chat.Chat.prompt(stub, [("Q1", "A1"), ("Q2", "")], 2) == (
      "USER: <|image|><|image|>Q1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:")
