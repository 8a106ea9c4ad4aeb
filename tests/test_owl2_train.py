"""mPLUG-Owl2 training through `python -m mplug2_jax.main`: both stage configs on the
instruction demo data (Grain pipeline, Vicuna-v1 loss mask, images), decreasing loss,
exact resume, stage-1 freezing (whole parameters and the text slices of the multiway
parameters bit-identical), and the optimizer's slice masks and layer-wise lr.

The runs are subprocesses on one CPU device sharing a persistent compilation cache, so a
config compiles once (as in test_train_loop.py).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mplug2_jax import experiment, param_store
from mplug2_jax.data import demo_instruction, instruction, pipeline, spm
from mplug2_jax.train import metrics as metrics_lib
from mplug2_jax.train import optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return os.environ.get("MPLUG2_TEST_JAX_CACHE") or str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  return demo_instruction.make_demo(str(tmp_path_factory.mktemp("owl2_demo")), 16, 4,
                                    log=lambda *_: None)


def run(cache, config, workdir, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env.pop("JAX_DEFAULT_PRNG_IMPL", None)
  proc = subprocess.run([sys.executable, "-m", "mplug2_jax.main", f"--config={config}",
                         f"--workdir={workdir}", "--config.checkpoint.every_steps=2", *extra],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def sft_config(demo):
  return (f"configs/owl2_sft.py:tiny,data={demo['instruction']},vocab={demo['tokenizer']},"
          f"steps={STEPS}")


def pretrain_config(demo):
  return (f"configs/owl2_pretrain.py:tiny,data={demo['image_text']},"
          f"vocab={demo['tokenizer']},steps={STEPS}")


def losses(workdir):
  return {r["step"]: (r["loss"], r["grad_norm"]) for r in metrics_lib.read_metrics(workdir)}


@pytest.fixture(scope="module")
def sft_run(cache, demo, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sft"))
  run(cache, sft_config(demo), workdir)
  return workdir


def test_pipeline_batch_follows_the_schema_and_the_template(demo):
  config = experiment.load(sft_config(demo))
  it = pipeline.make_iterator(config.data, split="train", batch_size=4, model_cfg=config.model,
                              process_index=0, process_count=1)
  batch = next(it)
  tok = spm.SentencePieceTokenizer(demo["tokenizer"])
  assert batch["input_ids"].shape == (4, config.data.max_length)
  assert batch["images"].shape == (4, 1, 56, 56, 3)
  for row in range(4):
    ids, labels = batch["input_ids"][row], batch["labels"][row]
    has_image = bool((ids == instruction.IMAGE_TOKEN_ID).any())
    assert batch["image_mask"][row, 0] == int(has_image)
    if not has_image:
      np.testing.assert_array_equal(batch["images"][row], 0.0)
    # Labels: only answers and their </s>, never the placeholder, BOS or padding.
    kept = labels != instruction.IGNORE_INDEX
    assert kept.any() and not kept[0]
    np.testing.assert_array_equal(labels[kept], ids[kept])
    assert (ids[kept] != instruction.IMAGE_TOKEN_ID).all()
    prompt = tok.decode([int(i) for i in ids[:np.argmax(kept)] if i >= 0])
    assert prompt.startswith(instruction.VICUNA_V1.system) and prompt.endswith("ASSISTANT:")


def test_sft_loss_decreases_and_resume_is_exact(sft_run, cache, demo, tmp_path):
  want = losses(sft_run)
  assert sorted(want) == list(range(1, STEPS + 1))
  assert want[STEPS][0] < want[1][0] - 0.05, want
  workdir = str(tmp_path / "stopped")
  proc = run(cache, sft_config(demo), workdir, "--stop_after=2")
  assert "stopped at step 2" in proc.stdout
  proc = run(cache, sft_config(demo), workdir)
  assert "resumed from" in proc.stderr
  assert losses(workdir) == want  # bit for bit


@pytest.mark.slow  # the slice masks: test_partial_and_layer_decay_scale_adam_updates
def test_pretrain_trains_only_the_vision_side_and_the_image_branch(sft_run, cache, demo,
                                                                  tmp_path):
  """Stage 1 from the stage-2 run's parameters: the loss decreases; the frozen LLM
  parameters and the text slices of the multiway ones stay bit-identical."""
  workdir = str(tmp_path / "pretrain")
  proc = run(cache, pretrain_config(demo), workdir, f"--config.init_checkpoint={sft_run}")
  assert "parameters loaded, 0 kept from init" in proc.stderr
  got = losses(workdir)
  assert got[STEPS][0] < got[1][0], got
  before = param_store.flatten(param_store.load_params(sft_run))
  after = param_store.flatten(param_store.load_params(workdir))
  for name in ("llm/embed/embedding", "llm/lm_head/kernel", "llm/norm/scale",
               "llm/layers/mlp/wi/kernel", "llm/layers/attn/query/kernel",
               "llm/layers/attn/out/kernel"):
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)
  for name in ("llm/layers/attn/key/kernel", "llm/layers/attn/value/kernel",
               "llm/layers/input_norm/scale", "llm/layers/post_norm/scale"):
    np.testing.assert_array_equal(after[name][:, 0], before[name][:, 0], err_msg=name)
    assert not np.array_equal(after[name][:, 1], before[name][:, 1]), name
  for name in ("vision/blocks/mlp/wi/kernel", "abstractor/query_embeds"):
    assert not np.array_equal(after[name], before[name]), name


def test_partial_and_layer_decay_scale_adam_updates():
  o = optimizer.default_optimizer_config()
  o.update(schedule="constant", lr=0.1, weight_decay=0.5, no_decay=(), lr_mults=(),
           partial=((r"^multi/", 1, (1,)),), layer_decay=0.5,
           layer_decay_blocks=r"^vision/blocks/", layer_decay_embed=r"^vision/embed")
  params = {"multi": {"kernel": jnp.ones((3, 2, 4))},
            "vision": {"blocks": {"w": jnp.ones((3, 2))}, "embed": jnp.ones(2),
                       "post": jnp.ones(2)}}
  tx, _ = optimizer.make(o, params, total_steps=10)
  grads = jax.tree.map(jnp.ones_like, params)
  upd, _ = tx.update(grads, tx.init(params), params)
  # First Adam step: -lr (1 + wd) per element (m / sqrt(v) = 1) times the factors.
  base = -0.1 * (1 + 0.5)
  np.testing.assert_allclose(upd["multi"]["kernel"][:, 0], 0.0)
  np.testing.assert_allclose(upd["multi"]["kernel"][:, 1], base, rtol=1e-5)
  np.testing.assert_allclose(upd["vision"]["blocks"]["w"],
                             base * np.array([[0.125] * 2, [0.25] * 2, [0.5] * 2]), rtol=1e-5)
  np.testing.assert_allclose(upd["vision"]["embed"], base * 0.0625, rtol=1e-5)
  np.testing.assert_allclose(upd["vision"]["post"], base, rtol=1e-5)


def test_sft_config_abstractor_lr_and_official_bug_switch():
  groups = lambda c: {k: v for k, v in c.optimizer.lr_mults}
  ours = experiment.load("configs/owl2_sft.py:7b")
  assert groups(ours)["^abstractor/"] == pytest.approx(1e-4 / 2e-5)
  official = experiment.load("configs/owl2_sft.py:7b,official_abstractor_lr=1")
  assert "^abstractor/" not in groups(official)
  assert (ours.optimizer.lr, ours.optimizer.weight_decay, ours.batch_size,
          ours.data.max_length, ours.optimizer.frozen) == (2e-5, 0.0, 256, 2048, ())
  assert ours.optimizer.warmup_steps == round(0.03 * ours.total_steps)
  experiment.validate(ours, 8)
  experiment.validate(experiment.load("configs/owl2_pretrain.py:7b"), 8)
  bad = experiment.load("configs/owl2_sft.py:tiny,layer_decay=1.5")
  with pytest.raises(Exception, match="optimizer.layer_decay"):
    experiment.validate(bad, 1)


def test_demo_question_wording_does_not_depend_on_the_answer():
  """Only the image can tell the answer: the open questions read the same for every
  colour, shape and count (a question such as "How many circle are there?" would give away
  the count and the shape)."""
  rng = np.random.default_rng(0)
  asked = {tuple(q["question"] for q in demo_instruction.image_questions(rng, c, s, n)
                 if q["kind"] == "open")
           for c in demo_instruction.COLOURS for s in demo_instruction.SHAPES for n in (1, 2, 3)}
  assert len(asked) == 1 and len(next(iter(asked))) == 3


def test_truncation_keeps_whole_images(demo):
  tok = spm.SentencePieceTokenizer(demo["tokenizer"])
  chat = [{"from": "human", "value": "<|image|>What colour is the shape?"},
          {"from": "gpt", "value": "red"}]
  full = instruction.encode_conversation(chat, tok, 10**6, has_image=True)
  n = len(full["input_ids"])
  where = int(np.flatnonzero(full["input_ids"] == instruction.IMAGE_TOKEN_ID)[0])
  record = dict(texts=[json.dumps(chat)],
                media=demo_instruction.demo.encode_jpeg(np.zeros((8, 8, 3), np.uint8)))
  # Expanded budget too small for the image's 9 positions after the placeholder's prefix:
  # the placeholder goes, and with it the image (no half image, slot empty).
  budget = where + 9 - 1
  row = instruction.pipeline_example(record, tok, max_length=budget, image_size=56, slots=1,
                                     tokens_per_image=9)
  assert not (row["input_ids"] == instruction.IMAGE_TOKEN_ID).any()
  assert row["image_mask"].tolist() == [0]
  # Enough room: the image stays, the rest is cut so that the spliced length fits.
  row = instruction.pipeline_example(record, tok, max_length=n, image_size=56, slots=1,
                                     tokens_per_image=9)
  assert row["image_mask"].tolist() == [1]
  assert int(row["attention_mask"].sum()) + 8 <= n
  # Official raw truncation keeps max_length raw ids (the spliced row is longer).
  row = instruction.pipeline_example(record, tok, max_length=n, image_size=56, slots=1,
                                     tokens_per_image=9, truncation="raw")
  assert int(row["attention_mask"].sum()) == n


# --------------------------------------------------------------------------------------
# LoRA.
# --------------------------------------------------------------------------------------


def lora_config(demo, steps=3):
  return (f"configs/owl2_lora.py:tiny,data={demo['instruction']},vocab={demo['tokenizer']},"
          f"steps={steps}")


def test_lora_optimizer_state_holds_only_adapters(demo):
  from mplug2_jax.models import registry

  config = experiment.load(lora_config(demo))
  family = registry.of(config.model)
  model = family.build(config.model)
  variables = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)},
                                                family.init_batch(config.model)))
  params = jax.tree.map(lambda x: x, __import__("flax").linen.meta.unbox(variables["params"]))
  assert set(params) == {"base", "lora"}
  adapted = sorted(optimizer.path_str(p).rsplit("/", 1)[0] for p, _ in
                   jax.tree_util.tree_flatten_with_path(params["lora"])[0])
  assert len(adapted) == 2 * 7  # a and b of q, k, v, o, gate, up, down
  tx, _ = optimizer.make(config.optimizer, params, total_steps=3)
  state = jax.eval_shape(tx.init, params)
  sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(state)]
  lora_size = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params["lora"]))
  assert sum(sizes) - sum(s for s in sizes if s <= 1) == 2 * lora_size  # Adam mu and nu


def test_lora_merge_and_peft_layout_match_torch_linear_semantics():
  """PEFT: y = x W^T + (alpha / r) x A^T B^T with A (r, in), B (out, r); ours folded into
  the Flax kernel (D, heads, hd) must give the same y, and the multiway copies and layers
  get their own module names."""
  from mplug2_jax.models.owl2 import lora

  cfg = lora.default_config()
  cfg.update(rank=2, alpha=6.0)
  rng = np.random.default_rng(0)
  layers, d, heads, hd = 2, 4, 3, 2
  base = {"llm": {"layers": {"attn": {
      "query": {"kernel": rng.normal(size=(layers, d, heads, hd)).astype(np.float32)},
      "key": {"kernel": rng.normal(size=(layers, 2, d, heads, hd)).astype(np.float32)}}}}}
  adapters = {"llm": {"layers": {"attn": {
      "query": {"kernel": {"a": rng.normal(size=(layers, d, 2)).astype(np.float32),
                           "b": rng.normal(size=(layers, 2, heads * hd)).astype(np.float32)}},
      "key": {"kernel": {"a": rng.normal(size=(layers, 2, d, 2)).astype(np.float32),
                         "b": rng.normal(size=(layers, 2, 2, heads * hd)).astype(np.float32)}}}}}}
  merged = lora.merge(base, adapters, cfg)
  state = lora.peft_state(adapters, cfg)
  assert len(state) == 2 * (layers + 2 * layers)
  x = rng.normal(size=(5, d)).astype(np.float32)
  for i in range(layers):
    for name, kernel, m in (("self_attn.q_proj", "query", None),
                            ("self_attn.k_proj.multiway.1", "key", 1)):
      w = base["llm"]["layers"]["attn"][kernel]["kernel"][i]
      mk = np.asarray(merged["llm"]["layers"]["attn"][kernel]["kernel"][i])
      if m is not None:
        w, mk = w[m], mk[m]
      torch_w = w.reshape(d, -1).T                             # official (out, in)
      a = state[f"base_model.model.model.layers.{i}.{name}.lora_A.weight"]
      b = state[f"base_model.model.model.layers.{i}.{name}.lora_B.weight"]
      want = x @ torch_w.T + 3.0 * (x @ a.T) @ b.T
      np.testing.assert_allclose(x @ mk.reshape(d, -1), want, rtol=1e-5, atol=1e-5)
  targets = lora.peft_config(cfg)["target_modules"]
  assert "k_proj.multiway.0" in targets and "lm_head" not in targets and "q_proj" in targets


def test_lora_training_keeps_base_weights_bit_identical(cache, demo, tmp_path):
  import orbax.checkpoint as ocp

  workdir = str(tmp_path / "lora")
  run(cache, lora_config(demo), workdir, "--config.checkpoint.every_steps=1")
  got = losses(workdir)
  assert got[3][0] < got[1][0], got
  with ocp.StandardCheckpointer() as c:
    first = c.restore(os.path.join(workdir, "checkpoints", "1", "state"))["params"]
  final = param_store.flatten(param_store.load_params(workdir))
  first = param_store.flatten(first)
  assert final.keys() == first.keys()
  for k in final:
    if k.startswith("base/"):
      np.testing.assert_array_equal(final[k], np.asarray(first[k]), err_msg=k)
  assert any(not np.array_equal(final[k], np.asarray(first[k])) for k in final
             if k.startswith("lora/") and k.endswith("/b"))


def _torch_owl2_llm(torch, m):
  """The Owl2 language model in torch (owl2.md section 4) under the official module
  names (`owl2_keys.tsv`), so that the official state dict loads strictly and HF PEFT
  finds `self_attn.k_proj.multiway.0` etc. by name. Forward: inputs_embeds (B, P, D),
  modality (B, P) (0 text, 1 image), attention_mask (B, P) -> logits (B, P, V); RoPE at
  positions 0..P-1 of every row (official; the same as ours for right padding)."""
  nn = torch.nn
  t = m.llm
  d, heads, hd = t.hidden_size, t.num_heads, t.hidden_size // t.num_heads
  assert t.num_kv_heads == heads  # the official multiway K/V support no GQA (bug 5)
  linear = lambda i, o: nn.Linear(i, o, bias=False)

  class RMSNorm(nn.Module):
    def __init__(self):
      super().__init__()
      self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
      var = x.float().pow(2).mean(-1, keepdim=True)
      return (x.float() * torch.rsqrt(var + t.rms_norm_eps)).to(x.dtype) * self.weight

  class Multiway(nn.Module):
    """Copy m for the tokens of modality m."""

    def __init__(self, make):
      super().__init__()
      self.multiway = nn.ModuleList([make() for _ in range(t.num_modalities)])

    def forward(self, x, modality):
      out = self.multiway[0](x)
      for i in range(1, len(self.multiway)):
        out = torch.where((modality == i)[..., None], self.multiway[i](x), out)
      return out

  class Rotary(nn.Module):
    def __init__(self):
      super().__init__()
      self.register_buffer("inv_freq", torch.zeros(hd // 2))  # filled by the export

    def forward(self, x, positions):                 # x (B, heads, P, hd), split halves
      angles = positions[:, None, :, None].float() * self.inv_freq
      angles = torch.cat([angles, angles], dim=-1)
      rotated = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], dim=-1)
      return x * angles.cos() + rotated * angles.sin()

  class Attention(nn.Module):
    def __init__(self):
      super().__init__()
      self.q_proj = linear(d, heads * hd)
      self.k_proj = Multiway(lambda: linear(d, heads * hd))
      self.v_proj = Multiway(lambda: linear(d, heads * hd))
      self.o_proj = linear(heads * hd, d)
      self.rotary_emb = Rotary()

    def forward(self, x, modality, positions, mask):
      b, p, _ = x.shape
      split = lambda y: y.view(b, p, heads, hd).transpose(1, 2)
      q = self.rotary_emb(split(self.q_proj(x)), positions)
      k = self.rotary_emb(split(self.k_proj(x, modality)), positions)
      v = split(self.v_proj(x, modality))
      scores = (q @ k.transpose(-1, -2)) / hd ** 0.5
      scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
      probs = scores.float().softmax(dim=-1).to(q.dtype)
      return self.o_proj((probs @ v).transpose(1, 2).reshape(b, p, heads * hd))

  class Mlp(nn.Module):
    def __init__(self):
      super().__init__()
      self.gate_proj = linear(d, t.intermediate_size)
      self.up_proj = linear(d, t.intermediate_size)
      self.down_proj = linear(t.intermediate_size, d)

    def forward(self, x):
      return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

  class Layer(nn.Module):
    def __init__(self):
      super().__init__()
      self.self_attn, self.mlp = Attention(), Mlp()
      self.input_layernorm = Multiway(RMSNorm)
      self.post_attention_layernorm = Multiway(RMSNorm)

    def forward(self, x, modality, positions, mask):
      x = x + self.self_attn(self.input_layernorm(x, modality), modality, positions, mask)
      return x + self.mlp(self.post_attention_layernorm(x, modality))

  class Decoder(nn.Module):
    def __init__(self):
      super().__init__()
      self.embed_tokens = nn.Embedding(t.vocab_size, d)
      self.layers = nn.ModuleList([Layer() for _ in range(t.layers)])
      self.norm = RMSNorm()

  class CausalLM(nn.Module):
    def __init__(self):
      super().__init__()
      self.model, self.lm_head = Decoder(), linear(d, t.vocab_size)

    def forward(self, inputs_embeds, modality, attention_mask):
      b, p, _ = inputs_embeds.shape
      positions = torch.arange(p).expand(b, p)
      mask = torch.ones(p, p, dtype=torch.bool).tril()[None, None] & \
          attention_mask.bool()[:, None, None, :]
      x = inputs_embeds
      for layer in self.model.layers:
        x = layer(x, modality, positions, mask)
      return self.lm_head(self.model.norm(x))

    def prepare_inputs_for_generation(self, *args, **kwargs):  # PEFT's CAUSAL_LM wrapper
      raise NotImplementedError("no generation in this reference")

  return CausalLM()


def _random_owl2_params(m, seed):
  """Random tiny Owl2 parameters with O(1) activations (random norm gains, so the text
  and image copies differ)."""
  import ml_collections
  from flax.linen import meta

  from mplug2_jax.models import owl2
  from mplug2_jax.models.owl2 import model as model_lib

  rng = np.random.default_rng(seed)
  model = model_lib.Owl2(ml_collections.FrozenConfigDict(m))
  shapes = param_store.flatten(meta.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(0), owl2.init_batch(m)))["params"]))

  def fill(path, shape):
    if path.endswith("/scale"):
      return 1 + 0.1 * rng.standard_normal(shape)
    if path.endswith("/bias"):
      return 0.1 * rng.standard_normal(shape)
    if path.endswith("/kernel"):
      if path.endswith(("query/kernel", "key/kernel", "value/kernel")):
        fan_in = shape[-3]                               # (..., in, heads, hd)
      elif path.endswith("attn/out/kernel"):
        fan_in = shape[-3] * shape[-2]                   # (..., heads, hd, out)
      else:
        fan_in = int(np.prod(shape[:-1])) if "patch_embed" in path else shape[-2]
      return rng.standard_normal(shape) / np.sqrt(fan_in)
    return 0.5 * rng.standard_normal(shape)             # embeddings, queries, tokens

  return {p: fill(p, s.shape).astype(np.float32) for p, s in sorted(shapes.items())}


def test_peft_export_gives_our_logits_in_torch(tmp_path):
  """A tiny Owl2 with random base weights and non-zero adapters: the base exported in the
  official layout (`convert/owl2`) loads strictly into a torch Owl2 language model with the
  official module names; our PEFT export attaches to it with `PeftModel.from_pretrained`
  (every tensor, scaling alpha / r); its logits with the adapters unmerged equal our
  `LoraOwl2`'s, and after `merge_and_unload` our merged model's (float32, 3e-5 of the
  logit scale), on text-only rows (torch embeds the ids itself) and on a row with an image
  (modality-1 tokens, fed as our spliced embeddings)."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  import ml_collections
  from safetensors.numpy import load_file as load_numpy
  from safetensors.torch import load_file as load_torch

  from mplug2_jax.convert import owl2 as conversion
  from mplug2_jax.models.owl2 import config as owl2_config
  from mplug2_jax.models.owl2 import lora
  from mplug2_jax.models.owl2 import model as model_lib
  from mplug2_jax.models.owl2 import schema as owl2_schema
  from mplug2_jax.tokens import IMAGE_TOKEN_INDEX

  m = owl2_config.model_config("tiny")
  m.lora.update(rank=3, alpha=7.5)                      # scaling 2.5
  flat = _random_owl2_params(m, seed=3)
  base = param_store.nest(flat)
  rng = np.random.default_rng(4)
  adapters = lora.init_adapters(jax.random.key(5), base, m.lora)
  adapters = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32),
                          adapters)                      # A and B non-zero
  merged = jax.tree.map(np.asarray, lora.merge(base, adapters, m.lora))

  # Ours: text-only rows (full, right-padded) and a row with an image placeholder.
  length, v = 10, m.llm.vocab_size
  ids = rng.integers(3, v, (3, length)).astype(np.int32)
  ids[:, 0] = m.llm.bos_token_id
  mask = np.ones((3, length), np.int32)
  mask[1, 6:] = mask[2, 8:] = 0
  ids[2, 3] = IMAGE_TOKEN_INDEX
  ids = np.where(mask > 0, ids, m.llm.pad_token_id).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": mask,
           "images": rng.standard_normal((3, 1, m.image_size, m.image_size, 3)).astype(
               np.float32),
           "image_mask": np.array([[0], [0], [1]], np.int32)}
  owl2_schema.check_images(batch)
  frozen = ml_collections.FrozenConfigDict(m)
  plain = jax.jit(lambda p, b: model_lib.Owl2(frozen, collect=True).apply({"params": p}, b))
  adapted = jax.jit(lambda p, b: lora.LoraOwl2(frozen).apply({"params": p}, b)[0]["logits"])
  ours_merged, aux = plain(merged, batch)
  ours_base = np.asarray(plain(base, batch)[0]["logits"])
  ours_unmerged = np.asarray(adapted({"base": base, "lora": adapters}, batch))
  ours_merged = np.asarray(ours_merged["logits"])
  seq_mask = np.array(aux["expanded_attention_mask"])
  modality = np.array(aux["modality_indicators"])
  real = seq_mask > 0
  p = seq_mask.shape[1]
  assert modality[2].sum() == m.abstractor.num_queries + 1 and not modality[:2].any()

  # The exports: official layout (one safetensors file) and PEFT.
  conversion.write_official(flat, m, str(tmp_path / "owl2.safetensors"))
  lora.export_peft(str(tmp_path / "adapter"), adapters, m.lora)
  config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "bias",
                                 "fan_in_fan_out", "use_rslora")} == {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 3, "lora_alpha": 7.5,
      "bias": "none", "fan_in_fan_out": False, "use_rslora": False}
  assert config["base_model_name_or_path"]
  assert sorted(config["target_modules"]) == sorted(
      ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "k_proj.multiway.0",
       "k_proj.multiway.1", "v_proj.multiway.0", "v_proj.multiway.1"])

  llm_only = lambda state: {k: val for k, val in state.items() if not k.startswith(
      ("model.vision_model.", "model.visual_abstractor."))}
  reference = _torch_owl2_llm(torch, m)
  reference.load_state_dict(llm_only(load_torch(str(tmp_path / "owl2.safetensors"))),
                            strict=True)
  reference.eval()

  def torch_logits(model):
    """Text rows from their ids (torch's own embedding), the image row from our spliced
    embeddings."""
    with torch.no_grad():
      text_ids = torch.from_numpy(np.pad(ids[:2], ((0, 0), (0, p - length))).astype(np.int64))
      embeds = torch.cat([model.model.embed_tokens(text_ids),
                          torch.from_numpy(np.array(aux["inputs_embeds"][2:]))])
      return model(embeds, torch.from_numpy(modality), torch.from_numpy(seq_mask)).numpy()

  def check(got, want, what):
    scale = float(np.abs(want[real]).max())
    diff = float(np.abs(got[real] - want[real]).max())
    assert diff <= 3e-5 * scale, f"{what}: max abs diff {diff:.3g} (logit scale {scale:.3g})"

  check(torch_logits(reference), ours_base, "base")
  model = peft.PeftModel.from_pretrained(reference, str(tmp_path / "adapter"))
  exported = load_numpy(str(tmp_path / "adapter" / "adapter_model.safetensors"))
  loaded = {k: val.numpy() for k, val in peft.get_peft_model_state_dict(
      model, save_embedding_layers=False).items()}  # no hub look-up of the base config
  assert sorted(loaded) == sorted(exported)             # every adapter attached by name
  for k in exported:
    np.testing.assert_array_equal(loaded[k], exported[k], err_msg=k)
  layers = [mod for mod in model.modules() if isinstance(mod, peft.tuners.lora.LoraLayer)]
  assert len(layers) == len(exported) // 2 == 9 * m.llm.layers
  assert all(mod.scaling["default"] == 2.5 for mod in layers)
  check(torch_logits(model.get_base_model()), ours_unmerged, "unmerged")
  unloaded = model.merge_and_unload()
  check(torch_logits(unloaded), ours_merged, "merged")
  # The adapters matter (far above the tolerance), and the merged weights are ours.
  assert np.abs(ours_merged - ours_base)[real].max() > 0.1 * np.abs(ours_base[real]).max()
  official_merged = llm_only(conversion.official.to_official(param_store.flatten(merged), m))
  for k, val in unloaded.state_dict().items():
    np.testing.assert_allclose(val.numpy(), official_merged[k], rtol=1e-5, atol=1e-6,
                               err_msg=k)


def test_batched_greedy_eval_left_and_right_padding_agree(sft_run, demo):
  """Every demo question answered once; left padding (official benchmarks) gives the
  same greedy answers as right padding (same shapes: one compile)."""
  from mplug2_jax.evaluate import owl2_bench as bench

  config = experiment.load(sft_config(demo))
  params = param_store.load_params(sft_run)
  tok = spm.SentencePieceTokenizer(demo["tokenizer"])
  examples, golds = bench.read_gold("demo_jsonl", [demo["questions_test"]])
  root = os.path.join(os.path.dirname(demo["questions_test"]), "images")
  kw = dict(fmt="vqa", tokenizer=tok, image_root=root, max_new_tokens=3, batch_size=4,
            length=96, style="vicuna_v1")
  left = bench.predict(config.model, params, examples, padding="left", **kw)
  right = bench.predict(config.model, params, examples, padding="right", **kw)
  assert sorted(left) == sorted(golds) and left == right
  scores = bench.score_demo(left, golds)
  assert {k.split("/")[0] for k in scores} <= {"open", "choice", "text"}
  assert all(0.0 <= v <= 100.0 for k, v in scores.items() if not k.endswith("/num"))


# --------------------------------------------------------------------------------------
# Packing.
# --------------------------------------------------------------------------------------


def test_packed_rows_give_the_unpacked_loss_and_less_padding(demo):
  """The demo conversations packed with segment ids: same mean loss as the unpacked rows
  (attention and RoPE positions stay inside each conversation), less padding."""
  from mplug2_jax.models import registry

  config = experiment.load(sft_config(demo))
  config.data.max_length = 96
  it = pipeline.make_iterator(config.data, split="train", batch_size=8, model_cfg=config.model,
                              process_index=0, process_count=1)
  batch = next(it)
  keys = ("input_ids", "attention_mask", "labels", "images", "image_mask")
  rows = [{k: batch[k][i] for k in keys} for i in range(8)]
  packed = instruction.pack(rows, max_length=192, slots=3)  # rows of twice the length
  assert len(packed["input_ids"]) < 8
  model = registry.build(config.model)
  family = registry.of(config.model)
  params = model.init({"params": jax.random.key(0)}, family.init_batch(config.model))["params"]
  unpacked = {k: jnp.asarray(batch[k]) for k in keys}
  assert (batch["labels"] != instruction.IGNORE_INDEX).sum() > 8
  loss = lambda b: family.objectives.lm_loss(*(lambda o: (o["logits"], o["labels"]))(
      model.apply({"params": params}, b)[0]))
  np.testing.assert_allclose(float(loss({k: jnp.asarray(v) for k, v in packed.items()})),
                             float(loss(unpacked)), rtol=2e-5)
  # One segment per row (same shapes: no new compile): the packed conversations see each
  # other and their positions run on, so the loss differs.
  mixed = dict(packed, segment_ids=(packed["attention_mask"] > 0).astype(np.int32))
  assert abs(float(loss({k: jnp.asarray(v) for k, v in mixed.items()}))
             - float(loss(unpacked))) > 1e-4


def test_packing_reduces_padding_on_a_long_tailed_length_distribution():
  """LLaVA-mixture-like lengths (log-normal raw lengths, median 180, one conversation in
  six text-only) at the 7B shapes (65 positions per image): unpacked rows of 2,048 raw
  ids (2,112 LLM positions) are mostly padding; packed rows of 1,536 raw ids with 8 image
  slots (2,048 LLM positions) are not."""
  rng = np.random.default_rng(0)
  per_image = 65
  rows = []
  for _ in range(256):
    has_image = rng.random() > 1 / 6
    n = int(np.clip(rng.lognormal(np.log(180), 0.8), 16, 1536 - per_image))
    ids = np.full(2048, instruction.PAD_ID, np.int32)
    ids[:n] = 5
    if has_image:
      ids[1] = instruction.IMAGE_TOKEN_ID
    rows.append(dict(input_ids=ids, attention_mask=(ids != 0).astype(np.int32),
                     labels=np.full(2048, -100, np.int32),
                     images=np.zeros((1, 1, 1, 3), np.float32),
                     image_mask=np.array([int(has_image)], np.int32)))
  stack = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  before = instruction.padding_fraction(stack, per_image)
  packed = instruction.pack(rows, max_length=1536, slots=8)
  after = instruction.padding_fraction(packed, per_image)
  assert before > 0.8 and after < 0.25, (before, after)
  assert len(packed["input_ids"]) < 256 / 4
