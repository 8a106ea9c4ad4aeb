r"""mPLUG-2 visual grounding fine-tuning (RefCOCO, RefCOCO+, RefCOCOg).

Modules: as video QA — image encoder -> universal layers; expression -> text encoder ->
fusion with the image -> decoder over [fused image ; fused expression], which generates the
box as 4 coordinate tokens after the prefix [unused339] (spec datasets.md 3.5; mplug2.md
6.3 `BertPrefixModelForGrounding`, 14). The pipeline gives each expression one decoder row
[unused339] t(cx) t(cy) t(w) t(h) (data/grounding.py); the loss is M1's
(`model_grounding_mplug.py:88-91,143-166`): cross-entropy over the 337 box tokens, weighted
by the teacher-forced box's L1 error x (1 - GIoU), with the official (bs, bs, 4) broadcast
of those weights (`objective.grounding_loss`, docs/official_quirks.md).

What the spec pins (datasets.md 3.5, M1 `configs/grounding_mplug_large.yaml`,
`dataset/grounding_dataset.py`, `dataset/vg_transforms.py`): 336 x 336 letterboxed images
(test: long side -> 336, centred, ImageNet mean/std; train: multi-scale/crop, colour jitter,
flip, CLIP mean/std, random offset), expressions lower-cased as [CLS] .. [SEP] in 20 tokens
(max_query_len), box (cx, cy, w, h) / 336 -> [unused{340 + floor(v * 336)}], inference 4
greedy steps over those 337 tokens, metric Acc@IoU >= 0.5 per split (configs/eval/refcoco*.py).

Not pinned by the spec, marked [unverified] below: the optimiser, schedule, epochs and batch
size (the values are the released mPLUG-2 fine-tuning recipe, spec mplug2.md 10: AdamW lr
2e-5 (vision tower 0.1x), wd 0.02, cosine_step with 200 warm-up iterations from 1e-6,
min_lr 1e-6, 10 epochs, 32 per step), the augmentation parameters (data/__init__.py
grounding_*), and the frames per image (16: the mPLUG-2 image-as-video convention of its
image loaders, datasets.md 2.6).

Arguments: size (tiny|base|large), data=DIR (a built grounding dataset; splits train / val /
testA / testB or test, `python -m mplug2_jax.data.build --kind grounding`),
train_examples (expressions per epoch; default 120624, the RefCOCO (unc) train split
[check against your build]), epochs (10), frames (0 = 16; tiny: 1), init=DIR (orbax params
converted for this config: the CLIP positional table is resized to the 24 x 24 grid of 336 px,
`python -m mplug2_jax.convert import-official --config configs/grounding.py:large ...`),
vocab=FILE (BERT vocab.txt; default the shipped bert-base-uncased), synthetic=1
(random batches instead of a dataset: timing runs; without data= the config fails).

  python -m mplug2_jax.main --config configs/grounding.py:large,data=/data/refcoco,init=/ckpt/mplug2_large \
      --workdir /runs/grounding_refcoco
"""

from mplug2_jax import config_lib, experiment
from mplug2_jax.data import grounding


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size="large", data="", train_examples=120624, epochs=10,
                           frames=0, init="", vocab="bert-base-uncased", synthetic=False)
  tiny = a.size == "tiny"
  config = experiment.base_config(a.size, task="grounding")
  m = config.model
  m.image_size = m.image_size if tiny else grounding.SIZE  # official 336 (tiny: 32 px)
  m.num_frames = a.frames or (1 if tiny else 16)           # [unverified] see the docstring
  # The box tokens are BERT's [unused339..676] (ids 344..681): the tiny preset's 512-entry
  # vocabulary would not hold them, so every size keeps the full uncased vocabulary.
  m.text.vocab_size = 30522
  m.dtype = "float32" if tiny else "bfloat16"              # official --do_amp
  config.batch_size = 2 if tiny else 32                    # [unverified] 4 per GPU x 8 GPUs

  d = config.data
  d.mixture = ((a.data, 1.0),) if a.data else ()
  d.task = "grounding"
  d.vocab_file = a.vocab
  d.train_split = "train"
  d.eval_split = "val"                   # in-loop selection; report testA/testB/test with
                                         # configs/eval/refcoco*.py
  d.max_text_len = 20                    # official max_query_len: [CLS] expression [SEP]
  d.repeat_images = True                 # the image as a still clip of num_frames frames
  d.randaug = False                      # not part of the grounding transforms
  # Geometry (data/grounding.py): official normalisations, augmentation defaults
  # [unverified], see data/__init__.py.
  d.grounding_train_norm = "clip"
  d.grounding_eval_norm = "imagenet"

  # Optimizer: the defaults (train/optimizer.py) are the released mPLUG-2 fine-tuning
  # values [unverified for grounding]: AdamW lr 2e-5 (vision tower 0.1x), wd 0.02,
  # cosine_step, 200 warm-up iterations from 1e-6, min_lr 1e-6, no clipping.
  o = config.optimizer
  o.accum_steps = 1
  config.total_steps, steps_per_epoch = config_lib.steps_for_epochs(
      a.epochs, a.train_examples, config.batch_size)

  config.checkpoint.every_steps = steps_per_epoch
  config.eval_every_steps = steps_per_epoch            # evaluates every epoch
  config.checkpoint.best_metric = "eval/accuracy_iou50"  # keep the best epoch as well
  config.log_every_steps = 50
  config.peak_tflops = 0.0    # per-device peak for MFU
  config.init_checkpoint = a.init
  config.synthetic_data = a.synthetic
  config.seed = 42
  # Decoding for evaluation: 4 greedy box-token steps (evaluate/grounding.py).
  return config
