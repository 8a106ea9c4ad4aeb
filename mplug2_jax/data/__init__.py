"""Input pipelines: ArrayRecord datasets read with Grain, batches with static shapes.

Modules, in the order data flows:
  sources.py   raw official/public layouts -> records      build.py  CLI building datasets
  records.py   tfds ArrayRecord builder + Grain source     demo.py   embedded demo dataset
  media.py     PyAV/Pillow decoding, frame sampler, transforms
  text.py      official text cleaning, WordPiece, task encodings (spm.py: SentencePiece)
  pipeline.py  per-task preprocessing, bad-data handling, batching, `make_iterator`
  grounding.py grounding geometry (letterbox, augmentations) and the box-token scheme
  instruction.py  mPLUG-Owl2 instruction tuning: template, loss mask, images, collator,
               the pipeline's `instruct` rows, packing (demo_instruction.py: demo data)
  benchmark.py clips/s/core

`default_data_config()` lists every `config.data` key the pipeline reads.
"""

from __future__ import annotations

import ml_collections

from mplug2_jax import config_lib

# Values of the enumerated `config.data` keys (the transforms' docstrings in media.py).
CHOICES = {
    "video_transform": ("finetune", "pretrain"),
    "image_transform": ("image", "video"),
    "video_eval_resize": ("nearest", "bicubic"),
    "bicubic_rounding": ("truncate", "round"),
    "pretrain_lm_targets": ("caption", "text"),
    "question_preprocess": ("pre_question", "raw"),
}


def default_data_config() -> ml_collections.ConfigDict:
  """`config.data` with every key the pipeline reads, its default and meaning."""
  d = ml_collections.ConfigDict()
  # Sources: built datasets (`python -m mplug2_jax.data.build` / `.demo`) and mixing weights.
  d.mixture = ()                # ((dataset_dir, weight), ...); weights are normalised
  d.train_split = "train"       # split name used for training (shuffled, repeated, augmented)
  d.eval_split = "test"         # any other split is read once, in order, without augmentation
  d.task = ""                   # "" = model.task; one of the family's data tasks (mPLUG-2:
                                # caption | videoqa | retrieval | pretrain | grounding |
                                # classification | text)
  # Tokenizer.
  d.tokenizer = "wordpiece"     # "wordpiece" (BERT uncased vocab.txt) | "sentencepiece"
  d.vocab_file = "bert-base-uncased"  # the shipped BERT uncased vocab.txt, a vocab.txt path,
                                      # or the .model file for sentencepiece
  # Video / image.
  d.num_frames = 0              # 0 = model.num_frames (official: 16 train and test)
  d.image_size = 0              # 0 = model.image_size (official: 224)
  d.repeat_images = False       # False: an image is one frame (T=1); True: repeated to
                                # num_frames (official image-as-video; needed to mix with video)
  d.randaug = True              # RandAugment: videos TemporalConsistentRandomAugment(2, 5),
                                # images RandomAugment(2, 7) (official; --no_randaug off)
  d.crop_scale = (0.5, 1.0)     # video RandomResizedCrop scale range (fine-tuning)
  d.hflip = True                # random horizontal flip p 0.5 (official); False when the
                                # text names left / right (the demo's motion captions)
  d.video_transform = "finetune"  # training clips: "finetune" (RandomResizedCrop, flip,
                                # RandAugment) | "pretrain" (official video pretraining:
                                # resize 1.14x, RandAugment with HorizontalFlip, RandomCrop)
  d.image_transform = "image"   # still images (image files): "image" = the official image
                                # transforms (train: Pillow-bicubic RandomResizedCrop
                                # `image_crop_scale`, flip, RandomAugment(2, 7) with
                                # AutoContrast / Equalize; test: bicubic resize); "video" =
                                # the video transforms above, as a one-frame clip
  d.image_crop_scale = (0.5, 1.0)  # image RandomResizedCrop scale (official fine-tuning;
                                # image pretraining (0.2, 1.0))
  d.video_eval_resize = "nearest"  # official video test resize; "bicubic" = corrected
  d.bicubic_rounding = "truncate"  # official `.long()` of the bicubic crop (out-of-range
                                # values kept, wrapping mod 256 in RandAugment's uint8 cast);
                                # "round" = rounded and clamped to [0, 255]
  d.clamp_uint8 = False         # image RandomAugment: official uint8 cast of Sharpness wraps
                                # out-of-range values; True clamps them
  # Captioning (spec mplug2.md 6.1; defaults reproduce the official behaviour exactly).
  d.caption_prompt = "a video of"
  d.caption_prompt_join = ""    # official: no space ("a video ofa man..."); " " = intended
  d.caption_off_by_one = True   # official: prompt_length = len([CLS] prompt) - 1
  d.caption_words = 80          # pre_caption word limit
  d.max_caption_len = 20        # tokens incl. [CLS]; a long caption loses its [SEP]
  # Pretraining prefix-LM (spec 13.2(4); M2 `video_caption_mplug2.py:70-73`).
  d.pretrain_lm_targets = "caption"  # "caption": decoder targets = caption_prompt + caption
                                # + [SEP] (the caption encoding above, prompt masked, at
                                # max_caption_len); "text": [CLS] text as ITC sees it
  # Video QA (spec 6.2, 7).
  d.question_preprocess = "pre_question"  # official video QA: pre_question (lower case,
                                # punctuation removed, word limit); "raw": the question as
                                # given (M1 VQA: pre_question commented out)
  d.question_words_train = 30   # pre_question word limits
  d.question_words_eval = 50
  d.max_question_len = 50       # tokens (official max_input_length with add_ocr)
  d.max_answer_len = 10         # tokens of "[CLS] answer [SEP]" (official: not truncated)
  d.answers_per_question = 1    # static answer rows per question; extra rows weight 0; a
                                # question with more answers keeps the heaviest (VQAv2: 10,
                                # every distinct answer with its weight, as M1)
  # Retrieval / pre-training / grounding.
  d.text_words = 30             # pre_caption word limit (image retrieval 30, MSRVTT 40);
                                # grounding expressions are only lower-cased (not used)
  d.max_text_len = 30           # tokens (grounding: official max_query_len 20, [CLS] .. [SEP])
  # mPLUG-Owl2 instruction batches (models/owl2/schema.py).
  d.max_length = 2048           # raw ids per sample, each image placeholder counting one
                                # (official model_max_length; the LLM sees the spliced length)
  d.images_per_sample = 1       # image slots per sample (official training: one image)
  d.truncation = "expanded"     # "expanded": keep the longest prefix whose spliced length
                                # (an image = its LLM tokens) fits max_length, an image
                                # never cut; "raw": max_length raw ids (official, bug 14)
  d.instruct_format = "conversation"  # "conversation" (instruction records, Vicuna-v1) |
                                # "caption" (image_text records as `<|image|>caption</s>`,
                                # stage-1 pre-training; our choice, unverified)
  d.image_aspect = "pad"        # Owl2 images: pad (official training) | resize | crop
  # Grounding geometry (data/grounding.py; spec datasets.md 3.5). The frame is image_size
  # (official 336); the box targets are answer tokens. [unverified] = not pinned by the spec.
  d.grounding_train_norm = "clip"      # official training normalisation (CLIP mean/std)
  d.grounding_eval_norm = "imagenet"   # official test default (ImageNet mean/std, which the
                                       # model never saw in training); "clip" = consistent
  d.grounding_scales = ()       # training long sides; () = image_size - 32 i, i = 0..6
                                # (multi-scale) [unverified]
  d.grounding_crop_prob = 0.5   # share of training samples cropped (crop keeps the box whole)
                                # [unverified]
  d.grounding_crop_min = 0.5    # smallest crop side / image side [unverified]
  d.grounding_jitter = 0.4      # brightness / contrast / saturation 1 +- this [unverified]
  d.grounding_flip = 0.5        # horizontal flip probability; the expression's left/right
                                # are swapped with it [swap not stated by the spec]
  # Bad data.
  d.max_bad_fraction = 0.01     # stop when more than this share of samples was bad
  d.bad_min_samples = 200       # ...counted only after this many samples
  d.max_replacements = 16       # tries of the following records for a bad one
  # Performance.
  d.num_workers = 0             # Grain worker processes (mp_prefetch); 0 = in-process
  d.per_worker_buffer_size = 2  # batches buffered per worker
  return d


def validate(d: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first enumerated `config.data` key with a bad value."""
  for key, allowed in CHOICES.items():
    config_lib.check(d[key] in allowed, f"data.{key}", d[key],
                     f"must be one of {allowed}{config_lib.did_you_mean(str(d[key]), allowed)}")
  for key in ("crop_scale", "image_crop_scale"):
    lo, hi = (tuple(d[key]) + (None, None))[:2]
    config_lib.check(len(tuple(d[key])) == 2 and 0 < lo <= hi <= 1, f"data.{key}", d[key],
                     "must be (low, high) with 0 < low <= high <= 1")
