r"""mPLUG-2 text-video / text-image retrieval fine-tuning (MSRVTT, DiDeMo, LSMDC, COCO, Flickr30K).

Modules: video encoder + universal layers and text encoder for ITC (projections to
`embed_dim` 256, learnable temperature, momentum model and feature queue), fusion model +
ITM head (hard negatives) for re-ranking. Loss: ITC + ITM (spec sections 6 and 13.3).

mPLUG-2 releases no retrieval recipe. The optimiser and schedule are the values all five
released fine-tuning YAMLs share (spec section 10: AdamW lr1 2e-5 / lr2 2e-6 for the vision
tower, weight decay 0.02, cosine_step with 200 warm-up iterations from 1e-6, min_lr 1e-6,
10 epochs, 224 px, 16 frames, 8 GPUs x 4); the ITC settings are mPLUG v1's (queue 65536,
momentum 0.995, alpha 0.4, temperature 0.07; queue / global batch must divide). [unverified
for retrieval: the paper's retrieval batch and epochs are not in the spec]

Official ITC / ITM details (M1 `models/model_retrieval_mplug.py`, `retrieval_*_mplug.py`):
in-batch keys and hard negatives from each device's local batch, alpha ramped over epoch 0.

Arguments: size (tiny|base|large), data=DIR (a built video_retrieval or image_text
dataset), image=1 (COCO / Flickr30K image-text data: 30 words / tokens, in-loop ITM
re-ranking of the top 256 by the ITM score alone, as M1), train_examples (pairs per epoch;
MSRVTT 9k: 180000 = 9000 videos x 20 captions), epochs (10), init=DIR (a parameters directory, e.g. a pretrained model),
vocab=FILE (BERT vocab.txt; default the shipped bert-base-uncased), synthetic=1
(random batches instead of a dataset: timing runs; without data= the config fails).

  python -m mplug2_jax.main --config configs/retrieval.py:large,data=/data/msrvtt_ret,init=/ckpt/mplug2_large \
      --workdir /runs/retrieval_msrvtt
  python -m mplug2_jax.benchmark --config configs/retrieval.py:tiny   (timing, synthetic)
"""

from mplug2_jax import config_lib, experiment


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size="large", data="", train_examples=180000, epochs=10,
                           init="", vocab="bert-base-uncased", synthetic=False, image=False)
  config = experiment.base_config(a.size, task="retrieval")
  config.batch_size = 2 if a.size == "tiny" else 32  # 4 per GPU x 8 GPUs
  config.model.dtype = "float32" if a.size == "tiny" else "bfloat16"

  d = config.data
  d.mixture = ((a.data, 1.0),) if a.data else ()
  d.task = "retrieval"
  d.vocab_file = a.vocab
  d.text_words = 30 if a.image else 40               # pre_caption limit (M1 image: 30)
  d.max_text_len = 10 if a.size == "tiny" else (30 if a.image else 40)
  d.repeat_images = a.image                          # images as still clips

  # Optimizer: the defaults (train/optimizer.py) are the official fine-tuning values:
  # AdamW lr 2e-5 (vision tower 0.1x), wd 0.02, cosine_step, 200 warm-up iterations
  # from 1e-6, min_lr 1e-6, no clipping.

  obj = config.objective
  obj.queue_size = 8 * config.batch_size if a.size == "tiny" else 65536
  obj.momentum = 0.995
  obj.alpha = 0.4
  # Official (M1 `model_retrieval_mplug.py`): in-batch ITC keys and ITM hard negatives from
  # each device's local batch (objective.negatives="local", the default), no epsilon.

  config.total_steps, steps_per_epoch = config_lib.steps_for_epochs(
      a.epochs, a.train_examples, config.batch_size)
  # Official: alpha ramps over epoch 0 (counted in iterations = micro-batches).
  obj.alpha_ramp_steps = steps_per_epoch * config.optimizer.accum_steps
  config.checkpoint.every_steps = steps_per_epoch
  config.eval_every_steps = steps_per_epoch          # t2v / v2t recall every epoch
  # k_test: ITM re-ranks the ITC top k; M1 scores video pairs by ITM + ITC, images by ITM
  # alone with k 256 (configs/eval/*_retrieval.py).
  config.eval.retrieval_k = 256 if a.image else 128
  config.eval.rerank_add_itc = not a.image
  config.checkpoint.best_metric = "eval/R_mean"
  config.log_every_steps = 50
  config.init_checkpoint = a.init
  config.synthetic_data = a.synthetic
  config.seed = 42
  return config
