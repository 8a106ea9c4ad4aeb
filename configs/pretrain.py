r"""mPLUG-2 pretraining: every module and head (ITC, ITM, MLM, prefix-LM decoder).

mPLUG-2 releases no pretraining recipe; the numbers are mPLUG v1's pretraining YAMLs
(spec section 13.3, `pretrain_mplug_{large,base}.yaml`): embed_dim 256, queue 65536,
momentum 0.995, temperature 0.07, distillation alpha 0.4, MLM 15 %;
  large: 128 per GPU, 224 px, AdamW lr1 5e-5 / lr2 5e-6, wd 0.02, cosine 30 epochs,
         warm-up 20, min_lr 2e-6
  base:  256 per GPU, 256 px, lr1 1e-4 / lr2 1e-5, min_lr 1e-6
The global batch assumes 8 GPUs per the official scripts (`gpus` argument).

Official mechanics (M1 / M2 code; docs/official_quirks.md): `sched: cosine` with
`warmup_epochs: 20` = 20 warm-up stairs of 100 iterations (2,000 iterations, stepped with
i // 100 in epoch 0), then one cosine value per epoch over 30 epochs
(`optimizer.schedule="cosine_epoch"`); ITC keys / positives and ITM hard negatives from each
device's local batch, alpha ramped from 0 over epoch 0; MLM and prefix-LM token means per
device; the prefix-LM generates "a video of" + caption + [SEP] with the prompt masked (spec
13.2(4)); video clips through the video pretraining transform (resize 1.14x, RandAugment
with HorizontalFlip, RandomCrop), images through the image pretraining transform
(RandomResizedCrop scale (0.2, 1), flip, RandomAugment(2, 7)).
The data mixture (spec 13.1): COCO, VG, SBU, CC3M, CC12M, WebVid-2M, text corpora; pass the
built datasets and weights with `mixture=` (`dir:weight;dir:weight`).

Arguments: size (tiny|base|large), mixture=, gpus (8), epochs (30), train_examples (pairs
per epoch), init=DIR (`python -m mplug2_jax.convert init-pretrained` output), vocab=FILE
(default the shipped bert-base-uncased), synthetic=1 (random batches: timing runs; without
mixture= the config fails).

  python -m mplug2_jax.main --config "configs/pretrain.py:large,mixture=/data/coco:1;/data/webvid:1" \
      --workdir /runs/pretrain_large
"""

from mplug2_jax import config_lib, experiment

# Size-specific values of the two YAMLs (tiny: for tests).
RECIPES = {
    "large": dict(per_gpu=128, image_size=224, lr=5e-5, min_lr=2e-6),
    "base": dict(per_gpu=256, image_size=256, lr=1e-4, min_lr=1e-6),
    "tiny": dict(per_gpu=1, image_size=32, lr=1e-3, min_lr=1e-5),
}


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size="large", mixture="", gpus=8, epochs=30,
                           train_examples=16_000_000, init="", vocab="bert-base-uncased",
                           synthetic=False)
  config_lib.check(a.size in RECIPES, "arg.size", a.size, f"must be one of {tuple(RECIPES)}")
  r = RECIPES[a.size]
  config = experiment.base_config(a.size, task="pretrain")
  config.model.image_size = r["image_size"]
  config.model.dtype = "float32" if a.size == "tiny" else "bfloat16"
  # Chosen by the AOT plan (docs/performance.md, `python -m mplug2_jax.benchmark.plan`):
  # the large step at 16 frames x 224 px, 4 videos per device, keeps the matmul outputs
  # (no forward recomputation) in 33-36 GiB per device on 8 to 256 devices (fits an 80 GiB
  # H100; predicted MFU 74% on H100). "full" remat (11-15 GiB, MFU 56%) is the fallback for
  # more tokens per device. The mesh default (1, -1, 1) is FSDP over all devices.
  if a.size != "tiny":
    config.model.remat_policy = "dots_with_no_batch_dims_saveable"
  config.batch_size = 2 if a.size == "tiny" else r["per_gpu"] * a.gpus

  d = config.data
  d.mixture = tuple((p.rsplit(":", 1)[0], float(p.rsplit(":", 1)[1]) if ":" in p else 1.0)
                    for p in a.mixture.split(";") if p)
  d.task = "pretrain"
  d.vocab_file = a.vocab
  d.max_text_len = 10 if a.size == "tiny" else 30
  d.repeat_images = True        # images and videos in one batch
  d.video_transform = "pretrain"          # M2 `dataset/__init__.py:45-53`
  d.image_crop_scale = (0.2, 1.0)         # M2 `dataset/__init__.py:23-30`
  d.pretrain_lm_targets = "caption"       # prompt + caption + [SEP], prompt masked
  d.caption_prompt = "a video of"
  d.max_caption_len = 10 if a.size == "tiny" else 30

  c = config.objective
  c.queue_size = 65536 if a.size != "tiny" else 4
  c.momentum = 0.995
  c.alpha = 0.4
  c.mlm_probability = 0.15
  config.model.embed_dim = 256
  config.model.temp = 0.07

  o = config.optimizer
  o.lr = r["lr"]                                   # lr1
  o.lr_mults = (("^vision/", 0.1),)                # lr2 = lr1 / 10
  o.weight_decay = 0.02
  o.warmup_lr = 1e-6
  o.min_lr = r["min_lr"]
  total, per_epoch = config_lib.steps_for_epochs(a.epochs, a.train_examples, config.batch_size)
  if a.size == "tiny":
    total, per_epoch = 10, 5
  config.total_steps = total
  o.schedule = "cosine_epoch"   # 20 stairs of 100 iterations, then a cosine over 30 epochs
  o.warmup_steps = 20 if a.size != "tiny" else 2
  o.warmup_stair = 100 if a.size != "tiny" else 1
  o.epochs = a.epochs if a.size != "tiny" else 2
  o.steps_per_epoch = per_epoch
  # Official alpha * min(1, i / len(data_loader)) in epoch 0 (i counts iterations).
  c.alpha_ramp_steps = per_epoch * o.accum_steps

  config.checkpoint.every_steps = 2000
  config.log_every_steps = 100
  config.peak_tflops = 0.0
  config.init_checkpoint = a.init  # `python -m mplug2_jax.convert init-pretrained` output
  config.synthetic_data = a.synthetic
  config.seed = 42
  return config
