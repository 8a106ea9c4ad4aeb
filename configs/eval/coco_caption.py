r"""MSCOCO (Karpathy test) image captioning: [unverified] (paper's table).

Images as 16-frame videos (official image-as-video); mPLUG-2's own COCO settings are not released.
Spec: shared/spec/mplug2.md sections 6 and 14.

Command:
  python -m mplug2_jax.evaluate --config configs/eval/coco_caption.py:data=DATA \
      --checkpoint CKPT [--workdir DIR]   (DATA: built dataset dir; vocab= for another vocab.txt)
"""

from mplug2_jax import experiment


def get_config(arg=None):
  return experiment.eval_experiment(
      "caption", arg, paper={},
      data=dict(caption_prompt='a video of', max_caption_len=20, repeat_images=True),
      settings=dict())
