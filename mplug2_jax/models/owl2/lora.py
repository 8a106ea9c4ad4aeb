"""LoRA for mPLUG-Owl2 that is LoRA (official bug 7 done right, `owl2.md` 11.2 and 12).

With `config.model.lora.rank > 0`, `build` returns `LoraOwl2`: its parameters are
`base/...` (the whole Owl2 tree, unchanged) and `lora/<kernel path>/{a, b}` for every
targeted kernel. The forward runs Owl2 on `base + (alpha / rank) A B` for the targeted
kernels, which is exactly `x W + (alpha / rank) x A B`. Training configs freeze `^base/`
(`optimizer.frozen`: `optax.set_to_zero`, no optimizer state), so only adapters are in
the optimizer state and the base weights stay bit-identical.

Targets (official `find_all_linear_names`, TR:158-170: every Linear outside the ViT and
the abstractor except `lm_head`): the LLM's q, k, v (both modality copies: each multiway
Linear has its own adapter, as PEFT wraps `k_proj.multiway.0` and `.1`), o, gate, up and
down projections. Official r 128, alpha 256. A is initialised as PEFT's Kaiming-uniform
(bound 1 / sqrt(fan_in)), B as zeros, so the adapted model starts equal to the base.

Shapes: a kernel (lead..., in..., out...) with `lead` = layer (and modality) axes gets
A (lead..., in, r) and B (lead..., r, out) with `in` / `out` flattened in row-major order,
the order of the PyTorch weights (`convert/owl2/official.py`). `peft_state` names them as
HF PEFT does (`base_model.model.<module>.lora_A.weight` (r, in), `lora_B.weight` (out, r)).
`peft.PeftModel.from_pretrained` on a torch model with the official module names attaches
them by name and gives our logits, unmerged and merged (docs/training.md, LoRA).
"""

from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mplug2_jax.models.owl2 import model as model_lib

Array = Any

# Kernel path -> (leading axes (layer, modality), input axes, official module name).
TARGETS = {
    "llm/layers/attn/query/kernel": (1, 1, "self_attn.q_proj"),
    "llm/layers/attn/key/kernel": (2, 1, "self_attn.k_proj.multiway.{m}"),
    "llm/layers/attn/value/kernel": (2, 1, "self_attn.v_proj.multiway.{m}"),
    "llm/layers/attn/out/kernel": (1, 2, "self_attn.o_proj"),
    "llm/layers/mlp/gate/kernel": (1, 1, "mlp.gate_proj"),
    "llm/layers/mlp/wi/kernel": (1, 1, "mlp.up_proj"),
    "llm/layers/mlp/wo/kernel": (1, 1, "mlp.down_proj"),
}


def default_config() -> ml_collections.ConfigDict:
  """`config.model.lora`."""
  return ml_collections.ConfigDict(dict(
      rank=0,              # 0 = off; official finetune_lora.sh: 128
      alpha=256.0,         # scale alpha / rank (official 256)
      targets=r"^llm/layers/(attn/(query|key|value|out)|mlp/(gate|wi|wo))/kernel$",
  ))


def _flat(tree: Any) -> dict[str, Any]:
  return {"/".join(str(k.key) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _set(tree: dict, path: str, value: Any) -> None:
  keys = path.split("/")
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value


def targets(base: Any, cfg: ml_collections.ConfigDict) -> dict[str, tuple[tuple, int, int]]:
  """{kernel path: (shape, leading axes, input axes)} of the adapted kernels."""
  out = {}
  for path, leaf in _flat(base).items():
    if re.search(cfg.targets, path):
      if path not in TARGETS:
        raise ValueError(f"config.model.lora.targets matches {path}, which has no LoRA layout "
                         f"(known: {sorted(TARGETS)})")
      lead, n_in, _ = TARGETS[path]
      out[path] = (tuple(leaf.shape), lead, n_in)
  return out


def init_adapters(rng, base: Any, cfg: ml_collections.ConfigDict, dtype=jnp.float32) -> dict:
  """{path: {"a", "b"}}: A Kaiming-uniform (PEFT), B zeros."""
  out: dict = {}
  for i, (path, (shape, lead, n_in)) in enumerate(sorted(targets(base, cfg).items())):
    fan_in = math.prod(shape[lead:lead + n_in])
    fan_out = math.prod(shape[lead + n_in:])
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(jax.random.fold_in(rng, i), shape[:lead] + (fan_in, cfg.rank),
                           dtype, -bound, bound)
    _set(out, path, {"a": a, "b": jnp.zeros(shape[:lead] + (cfg.rank, fan_out), dtype)})
  return out


def delta(shape: tuple, lead: int, a: Array, b: Array, scale: float) -> Array:
  """scale A B reshaped to the kernel's shape."""
  return (scale * jnp.matmul(a, b)).reshape(shape)


def merge(base: Any, adapters: Any, cfg: ml_collections.ConfigDict) -> Any:
  """Base parameters with every adapter folded in (same tree and dtypes as `base`)."""
  flat_adapters = {p.rsplit("/", 1)[0]: None for p in _flat(adapters)}
  scale = float(cfg.alpha) / float(cfg.rank)

  def one(path, w):
    name = "/".join(str(k.key) for k in path)
    if name not in flat_adapters:
      return w
    ab = adapters
    for k in name.split("/"):
      ab = ab[k]
    lead = TARGETS[name][0]
    return (w + delta(w.shape, lead, ab["a"], ab["b"], scale).astype(w.dtype)).astype(w.dtype)

  return jax.tree_util.tree_map_with_path(one, base)


class LoraOwl2(nn.Module):
  """Owl2 with LoRA adapters (see the module docstring); same call signature."""

  config: ml_collections.ConfigDict
  deterministic: bool = True
  collect: bool = False
  use_cache: bool = False

  def _inner(self) -> model_lib.Owl2:
    return model_lib.Owl2(self.config, deterministic=self.deterministic, collect=self.collect,
                          use_cache=self.use_cache, parent=None)

  @nn.compact
  def __call__(self, batch: dict[str, Array]):
    inner = self._inner()
    base = self.param("base", lambda rng: inner.init(rng, batch)["params"])
    adapters = self.param("lora", lambda rng: init_adapters(rng, base, self.config.lora))
    return inner.apply({"params": merge(base, adapters, self.config.lora)}, batch)


def merged_params(params: dict, cfg: ml_collections.ConfigDict) -> dict:
  """A `LoraOwl2` parameter tree -> plain Owl2 parameters with the adapters merged."""
  return merge(params["base"], params["lora"], cfg)


def peft_state(adapters: dict, cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """HF PEFT `adapter_model.safetensors` tensors of the adapters (float32)."""
  del cfg
  out = {}
  flat = _flat(adapters)
  for path in sorted({p.rsplit("/", 1)[0] for p in flat}):
    lead, _, module = TARGETS[path]
    a, b = np.asarray(flat[path + "/a"], np.float32), np.asarray(flat[path + "/b"], np.float32)
    for i in range(a.shape[0]):
      for m in (range(a.shape[1]) if lead == 2 else (None,)):
        ai, bi = (a[i], b[i]) if m is None else (a[i, m], b[i, m])
        prefix = f"base_model.model.model.layers.{i}.{module.format(m=m)}"
        out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(ai.T)   # (r, in)
        out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(bi.T)   # (out, r)
  return out


def peft_config(cfg: ml_collections.ConfigDict,
                base_model: str = "MAGAer13/mplug-owl2-llama2-7b") -> dict:
  """HF PEFT `adapter_config.json`."""
  # PEFT matches a target by module-name suffix; the multiway copies are named in full
  # so that the multiway RMSNorms (also `*.multiway.{0,1}`) are not matched.
  modules = sorted({TARGETS[p][2].split(".", 1)[1].format(m=m)
                    for p in TARGETS for m in range(TARGETS[p][0])})
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
          "r": int(cfg.rank), "lora_alpha": float(cfg.alpha), "lora_dropout": 0.0,
          "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
          "use_rslora": False, "use_dora": False,   # scaling alpha / r, plain LoRA
          "target_modules": modules, "init_lora_weights": True}


def export_peft(directory: str, adapters: dict, cfg: ml_collections.ConfigDict) -> None:
  """Writes `adapter_config.json` + `adapter_model.safetensors` (HF PEFT layout)."""
  import json

  from etils import epath
  from safetensors.numpy import save_file

  out = epath.Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  (out / "adapter_config.json").write_text(json.dumps(peft_config(cfg), indent=1))
  save_file(peft_state(adapters, cfg), str(out / "adapter_model.safetensors"))
