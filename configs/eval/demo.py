r"""Evaluation on the held-out split of the embedded demo dataset (no paper numbers).

  task=retrieval   text-to-video / video-to-text R@1/5/10 on demo video_retrieval (3
                   captions per clip), ITC similarities re-ranked by ITM (top 16)
  task=caption     BLEU-1..4, METEOR, ROUGE-L, CIDEr on demo video_caption (3 references)
  task=videoqa     exact-match accuracy on demo video_qa (colour, shape, direction)
  task=classification  top-1 of the motion direction on demo video_classification

Command (`python -m mplug2_jax.demo_job` runs all four, for the trained and the untrained
model, and prints the table):
  python -m mplug2_jax.evaluate --config configs/eval/demo.py:task=retrieval,data=DEMO \
      --checkpoint RUN_WORKDIR      (DEMO: `python -m mplug2_jax.data.demo --out DEMO`)
"""

import os

from mplug2_jax import experiment

DATASETS = {"retrieval": "video_retrieval", "caption": "video_caption", "videoqa": "video_qa",
            "classification": "video_classification"}


def get_config(arg=None):
  from mplug2_jax import config_lib

  a = config_lib.parse_arg(arg, task="retrieval", data="/tmp/demo", batch=16)
  if a.task not in DATASETS:
    raise config_lib.ConfigError("demo eval task", a.task, f"must be one of {tuple(DATASETS)}")
  settings = {"retrieval": dict(retrieval_k=16, all_texts=True)}.get(a.task, {})
  config = experiment.eval_experiment(
      a.task, f"size=tiny,batch={a.batch}", paper={},
      data=dict(text_words=30, max_text_len=16, max_caption_len=16, max_question_len=16,
                max_answer_len=6, repeat_images=True),
      settings=settings)
  config.data.mixture = ((os.path.join(a.data, DATASETS[a.task]), 1.0),)
  return config
