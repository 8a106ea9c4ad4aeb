r"""Flickr30K (1k test) image-text retrieval: R@1/5/10 [unverified] (paper's table).

Every caption of each image (eval.all_texts).
Spec: shared/spec/mplug2.md sections 6 and 14.

Command:
  python -m mplug2_jax.evaluate --config configs/eval/flickr_retrieval.py:data=DATA \
      --checkpoint CKPT [--workdir DIR]   (DATA: built dataset dir; vocab= for another vocab.txt)
"""

from mplug2_jax import experiment


def get_config(arg=None):
  return experiment.eval_experiment(
      "retrieval", arg, paper={},
      data=dict(text_words=30, max_text_len=30, repeat_images=True),
      settings=dict(retrieval_k=128, all_texts=True))
