r"""mPLUG-Owl2 stage 1: pre-training on image-text pairs (owl2.md 11.1).

Every value below is from the paper as recalled in owl2.md 11.1, **unverified** (the
paper text was not re-checked), and each is a config key: ~348M pairs = 42,500
iterations x global batch 8,192; AdamW with beta2 0.98; peak lr 1e-4 with cosine decay
after ~1,000 warm-up iterations; weight decay 0.05; images 224 x 224 in the paper (here
`image_size`, default 448: the positional tables fix one size and stage 2 runs at 448;
224 needs a position interpolation that is not implemented).

Which parts train (paper: the vision encoder, the visual abstractor and the image branch
of the modality-adaptive module; the rest of the LLM frozen): `optimizer.frozen` freezes
whole parameters (no optimizer state, zero update: `optax.set_to_zero` in
`optax.multi_transform`), and `optimizer.partial` trains only index 1 (image) of the
modality axis of the multiway K/V projections and RMSNorm gains, whose text slices keep
their values exactly (optimizer.py). No `stop_gradient` in the model: the loss still
back-propagates through the frozen LLM into the vision side.

Data: an `image_text` dataset, each pair as `<|image|>caption</s>` with loss on the
caption (`data.instruct_format = "caption"`; LLaVA's plain format: our choice, the
paper does not give the stage-1 format). Sequence 256 raw tokens (our choice).

Arguments: size (tiny|7b), data=DIR (built `image_text` dataset), vocab=FILE (LLaMA
tokenizer.model), steps (42500), batch (8192; tiny 4), accum (32; tiny 1), lr (1e-4),
warmup (1000), weight_decay (0.05), b2 (0.98), image_size (0 = the model's), init=DIR
(LLaMA-2 + CLIP import: `python -m mplug2_jax.convert init-pretrained`), synthetic=1.

  python -m mplug2_jax.main --config configs/owl2_pretrain.py:7b,data=/d/pairs,\
vocab=/ckpt/tokenizer.model,init=/ckpt/owl2_init --workdir /runs/owl2_pt

Runtime and result: the tiny config on the demo pairs (`python -m
mplug2_jax.data.demo_instruction`) trains with decreasing loss, frozen parameters
bit-identical (tests/test_owl2_train.py); no 7B run has been made.
"""

from mplug2_jax import config_lib, experiment


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size="7b", data="", vocab="", steps=42_500, batch=0,
                           accum=0, lr=1e-4, warmup=1000, weight_decay=0.05, b2=0.98,
                           image_size=0, init="", synthetic=False)
  config = experiment.base_config(a.size, task="instruct", family="owl2")
  tiny = a.size == "tiny"
  config.batch_size = a.batch or (4 if tiny else 8192)
  config.model.dtype = "float32" if tiny else "bfloat16"
  if not tiny:
    config.model.remat_policy = "full"
  if a.image_size:
    config.model.image_size = a.image_size
    config.model.abstractor.grid_size = a.image_size // config.model.vision.patch_size

  d = config.data
  d.task = "instruct"
  d.mixture = ((a.data, 1.0),) if a.data else ()
  d.tokenizer = "sentencepiece"
  d.vocab_file = a.vocab
  d.max_length = 48 if tiny else 256
  d.images_per_sample = 1
  d.image_size = 0
  d.truncation = "expanded"
  d.instruct_format = "caption"
  d.image_aspect = "pad"

  o = config.optimizer
  o.lr = a.lr if not tiny or a.lr != 1e-4 else 1e-3
  o.b2 = a.b2
  o.weight_decay = a.weight_decay
  o.no_decay = (r"bias$", r"/scale$")
  o.lr_mults = ()
  # Frozen: the shared LLM (embeddings, Q/O projections, MLPs, final norm, LM head).
  o.frozen = (r"^llm/(embed|norm|lm_head)/", r"^llm/layers/(attn/(query|out)|mlp)/")
  # Trained slices: the image branch (modality 1 on axis 1 of the stacked multiway
  # parameters (layers, 2, ...)); the text branch stays frozen.
  o.partial = ((r"^llm/layers/(input_norm|post_norm|attn/(key|value))/", 1, (1,)),)
  o.schedule = "cosine_step"
  o.warmup_steps = min(a.warmup, max(1, a.steps // 10)) if tiny else a.warmup
  o.warmup_lr = 0.0
  o.min_lr = 0.0
  o.warmup_prefix = True
  o.lr_lag = False  # HF Trainer: step k runs at sched(k)
  o.grad_clip_norm = 1.0                              # our choice (unverified)
  o.accum_steps = a.accum or (1 if tiny else 32)
  config.total_steps = a.steps

  config.checkpoint.every_steps = max(1, a.steps // 10)
  config.log_every_steps = 1 if tiny else 10
  config.init_checkpoint = a.init
  config.synthetic_data = a.synthetic
  config.seed = 42
  return config
