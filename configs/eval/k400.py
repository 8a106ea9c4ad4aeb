r"""Kinetics-400 action recognition: top-1 **87.1**, top-5 **97.7** (papers-with-code record).

Single view, middle-frame sampling, linear head on the video [CLS] (no multi-view testing here).
Spec: shared/spec/mplug2.md sections 6 and 14.

Command:
  python -m mplug2_jax.evaluate --config configs/eval/k400.py:data=DATA \
      --checkpoint CKPT [--workdir DIR]   (DATA: built dataset dir; vocab= for another vocab.txt)
"""

from mplug2_jax import experiment


def get_config(arg=None):
  return experiment.eval_experiment(
      "classification", arg, paper={'top1': 87.1, 'top5': 97.7},
      data=dict(),
      settings=dict(), model=dict(num_classes=400))
