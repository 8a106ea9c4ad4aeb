r"""mPLUG-Owl2 benchmarks: one paper table row per `bench=` (evaluate/owl2_bench.py).

  python -m mplug2_jax.evaluate.owl2_bench --config configs/owl2_eval.py:bench=vqav2,\
gold=/d/v2_OpenEnded_mscoco_val2014_questions.json+/d/v2_mscoco_val2014_annotations.json,\
images=/d/val2014,vocab=/ckpt/tokenizer.model --checkpoint /ckpt/owl2_7b

Rows (format, metric, greedy max_new_tokens, the paper's number: all paper numbers are
from memory of arXiv 2311.04257 and **unverified**): vqav2 79.4, okvqa 57.7, textvqa 58.2,
vizwiz 54.5, gqa 56.1 (exact match), scienceqa_img 68.7, mmbench 64.5, mme 1450.2
(perception), mmlu 53.4, coco_caption 137.3 (CIDEr), flickr30k 85.1 (CIDEr).
`gold` is the official file(s) of the row's layout, joined by "+" (read_gold documents
each layout); `images` the image folder; `style=vicuna_v1` prompts with the training
template instead of the official inference one.

Runtime and result: no benchmark data is available offline, so no row has been run; the
formats are tested on hand-written files (tests/test_owl2_eval.py).
"""

import ml_collections

from mplug2_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, bench="vqav2", gold="", images="", vocab="", batch=8,
                           style="official", padding="left")
  from mplug2_jax.evaluate import owl2_bench

  if a.bench not in owl2_bench.BENCHMARKS:
    raise config_lib.ConfigError("arg.bench", a.bench,
                                 f"one of {sorted(owl2_bench.BENCHMARKS)}")
  row = owl2_bench.BENCHMARKS[a.bench]
  c = ml_collections.ConfigDict()
  c.bench = a.bench
  c.format = row["format"]
  c.metric = row["metric"]
  c.layout = row["layout"]
  c.max_new_tokens = row["max_new_tokens"]
  c.paper = ml_collections.ConfigDict({row["metric"]: row["paper"]})  # unverified
  c.gold = tuple(p for p in a.gold.split("+") if p)
  c.images = a.images
  c.vocab_file = a.vocab
  c.batch_size = a.batch
  c.style = a.style
  c.padding = a.padding
  return c
