r"""mPLUG-Owl2 stage-2 LoRA fine-tuning that is LoRA (`scripts/finetune_lora.sh`, owl2.md 11.2).

Official values: r 128, alpha 256, lr 1e-4, adapters on every Linear outside the ViT and
the abstractor except lm_head (TR:158-170); the rest of the recipe as `owl2_sft.py`
(cosine, warm-up ratio 0.03, weight decay 0, sequence 2048, global batch 256). Unlike the
official script (bug 7: `requires_grad_(True)` after wrapping trains every base weight),
the base model (`base/...`) is frozen by `optimizer.frozen` (no optimizer state) and only
the adapters (`lora/...`) train; the ViT and the abstractor stay frozen too. Not
implemented: the official lora_dropout (0.05 in the HF PEFT default of the script; here 0).

Export: `python -m mplug2_jax.models.owl2.lora_export` is not a CLI; use
`models/owl2/lora.py` `export_peft(dir, params["lora"], config.model.lora)` (HF PEFT
`adapter_config.json` + `adapter_model.safetensors`) or `merged_params` for a plain
parameters tree.

Arguments: as configs/owl2_sft.py, plus rank (128; tiny 4) and alpha (256; tiny 8).

  python -m mplug2_jax.main --config configs/owl2_lora.py:7b,data=/d/llava665k,\
vocab=/ckpt/tokenizer.model --workdir /runs/owl2_lora

Runtime and result: the tiny config trains on the instruction demo data with decreasing
loss and bit-identical base weights (tests/test_owl2_train.py); no 7B run has been made.
Note that `init=` must point at a LoRA-layout parameters directory (`base/...`).
"""

import importlib.util
import os

from mplug2_jax import config_lib


def _sft():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "owl2_sft.py")
  spec = importlib.util.spec_from_file_location("_owl2_sft", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size="7b", data="", vocab="", steps=0, batch=0, init="",
                           synthetic=False, rank=0, alpha=0.0, lr=0.0)
  tiny = a.size == "tiny"
  sft_arg = (f"{a.size},data={a.data},vocab={a.vocab},steps={a.steps},batch={a.batch},"
             f"init={a.init},synthetic={int(a.synthetic)}")
  config = _sft().get_config(sft_arg)
  lo = config.model.lora
  lo.rank = a.rank or (4 if tiny else 128)
  lo.alpha = a.alpha or (8.0 if tiny else 256.0)
  o = config.optimizer
  o.lr = a.lr or (1e-2 if tiny else 1e-4)
  o.frozen = (r"^base/",)
  o.lr_mults = ()
  o.layer_decay = 1.0
  return config
