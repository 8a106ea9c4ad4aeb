r"""Kinetics-400 action recognition: top-1 **87.1**, top-5 **97.7** (papers-with-code record).

Single view, middle-frame sampling, linear head on the video [CLS]. The paper's numbers come
from its classification protocol, which (like other video classifiers') averages several
temporal clips x spatial crops per video [protocol unverified]; this evaluation has no
multi-view testing, so the row is marked "(multi-view)" and is not a like-for-like
comparison.
Spec: shared/spec/mplug2.md sections 6 and 14.

Command:
  python -m mplug2_jax.evaluate --config configs/eval/k400.py:data=DATA \
      --checkpoint CKPT [--workdir DIR]   (DATA: built dataset dir; vocab= for another vocab.txt)
"""

from mplug2_jax import experiment


def get_config(arg=None):
  return experiment.eval_experiment(
      "classification", arg, paper={'top1': '87.1 (multi-view)', 'top5': '97.7 (multi-view)'},
      data=dict(),
      settings=dict(), model=dict(num_classes=400))
