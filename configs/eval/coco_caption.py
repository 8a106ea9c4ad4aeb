r"""MSCOCO (Karpathy test) image captioning: [unverified] (paper's table).

Images as 16-frame videos (official image-as-video) through the official image test
transform (bicubic resize). mPLUG-2's own COCO settings are not released; these are M1's
(datasets.md 3.3, M1 `caption_mplug.py:50-57`, `scripts/caption_mplug_large.sh:16-18`): no
prompt, captions of up to 25 tokens, generation 8-25 tokens.
Spec: shared/spec/mplug2.md sections 6 and 14.

Command:
  python -m mplug2_jax.evaluate --config configs/eval/coco_caption.py:data=DATA \
      --checkpoint CKPT [--workdir DIR]   (DATA: built dataset dir; vocab= for another vocab.txt)
"""

from mplug2_jax import experiment


def get_config(arg=None):
  return experiment.eval_experiment(
      "caption", arg, paper={},
      data=dict(caption_prompt='', max_caption_len=25, repeat_images=True),
      settings=dict(prompt='', min_length=8, max_length=25))
