r"""mPLUG-Owl2 instruction tuning (stage 2, the official `scripts/finetune.sh` recipe).

Sizes: tiny (the golden tiny_a configuration: tests, seconds on CPU), 7b (the released
model, LLaMA-2-7B + ViT-L/14 at 448 px: 8,197,859,328 parameters).

Official recipe (owl2.md 11.2): AdamW (HF defaults: betas 0.9 / 0.999, eps 1e-8,
gradient clipping at norm 1.0) lr 2e-5, linear warm-up over 3% of the steps then cosine to
0, weight decay 0, 1 epoch of the LLaVA-1.5 665k mixture, global batch 256 (2 per GPU x
8 accumulation x 16 GPUs), bf16, model_max_length 2048 raw ids (image placeholders count
one), ViT frozen (`--freeze_vision_model True`), abstractor and the whole LLM (both modality
branches) trained, gradient checkpointing (our remat). The official ZeRO-3 is our fsdp axis.
The official `--visual_abstractor_lr` has no effect (bug 8), so no separate rate here.

The recipe with the paper's departures (ViT trained at a layer-wise lr, the abstractor at
its own lr) is `configs/owl2_sft.py`; stage 1 is `configs/owl2_pretrain.py`, LoRA
`configs/owl2_lora.py`.

Arguments: size (tiny|7b), data=DIR (a built `instruction` dataset, read by the Grain
pipeline's `instruct` task), train_examples (665298), epochs (1),
init=DIR (`python -m mplug2_jax.convert import-official` or `init-pretrained` output),
vocab=FILE (the LLaMA tokenizer.model), synthetic=1 (random batches of the Owl2 schema).

  python -m mplug2_jax.main --config configs/owl2.py:7b,synthetic=1,init=/ckpt/owl2_7b \
      --workdir /runs/owl2_sft
"""

from mplug2_jax import config_lib, experiment


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size="7b", data="", train_examples=665_298, epochs=1.0,
                           init="", vocab="", synthetic=False)
  config = experiment.base_config(a.size, task="instruct", family="owl2")
  tiny = a.size == "tiny"
  accum = 1 if tiny else 8
  config.batch_size = 2 if tiny else 256            # official: 2 per GPU x 8 x 16 GPUs
  config.model.dtype = "float32" if tiny else "bfloat16"
  if not tiny:
    config.model.remat_policy = "full"              # official gradient checkpointing

  d = config.data
  d.task = "instruct"
  d.mixture = ((a.data, 1.0),) if a.data else ()
  d.tokenizer = "sentencepiece"
  d.vocab_file = a.vocab
  d.max_length = 16 if tiny else 2048
  d.images_per_sample = 1
  d.image_size = 0                                  # the model's (448; tiny 56)

  o = config.optimizer
  o.lr = 2e-5
  o.lr_mults = ()
  o.weight_decay = 0.0
  o.frozen = (r"^vision/",)                         # --freeze_vision_model True
  o.schedule = "cosine_step"
  o.warmup_lr = 0.0                                 # HF linear warm-up from 0
  o.min_lr = 0.0                                    # HF cosine to 0
  o.warmup_prefix = True                            # HF: the cosine starts after warm-up
  o.lr_lag = False                                  # HF: step k runs at sched(k)
  o.grad_clip_norm = 1.0                            # HF Trainer max_grad_norm
  o.accum_steps = accum
  config.total_steps, steps_per_epoch = config_lib.steps_for_epochs(
      a.epochs, a.train_examples, config.batch_size)
  o.warmup_steps = max(1, round(0.03 * config.total_steps))  # warmup_ratio 0.03

  config.checkpoint.every_steps = max(1, steps_per_epoch // 10)
  config.log_every_steps = 1 if tiny else 10
  config.init_checkpoint = a.init
  config.synthetic_data = a.synthetic
  config.seed = 42
  return config
