r"""Kinetics-600 action recognition: [unverified] (paper's table).

Single view; num_classes=600.
Spec: shared/spec/mplug2.md sections 6 and 14.

Command:
  python -m mplug2_jax.evaluate --config configs/eval/k600.py:data=DATA \
      --checkpoint CKPT [--workdir DIR]   (DATA: built dataset dir; vocab= for another vocab.txt)
"""

from mplug2_jax import experiment


def get_config(arg=None):
  return experiment.eval_experiment(
      "classification", arg, paper={},
      data=dict(),
      settings=dict(), model=dict(num_classes=600))
