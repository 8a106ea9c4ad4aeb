r"""MSRVTT video captioning: CIDEr **80.3** (paper; repo README, abstract).

Beam 5, 4-20 tokens, text after the last 'a video of'; COCO scorer (CIDEr 0.803 = 80.3).
Spec: shared/spec/mplug2.md sections 6 and 14.

Command:
  python -m mplug2_jax.evaluate --config configs/eval/msrvtt_caption.py:data=DATA \
      --checkpoint CKPT [--workdir DIR]   (DATA: built dataset dir; vocab= for another vocab.txt)
"""

from mplug2_jax import experiment


def get_config(arg=None):
  return experiment.eval_experiment(
      "caption", arg, paper={'CIDEr': 0.803},
      data=dict(caption_prompt='a video of', max_caption_len=20),
      settings=dict())
