r"""Kinetics-700 action recognition: [unverified] (paper's table).

Single view; num_classes=700.
Spec: shared/spec/mplug2.md sections 6 and 14.

Command:
  python -m mplug2_jax.evaluate --config configs/eval/k700.py:data=DATA,vocab=VOCAB \
      --checkpoint CKPT [--workdir DIR]   (DATA: built dataset dir, VOCAB: vocab.txt)
"""

from mplug2_jax.evaluate import tasks


def get_config(arg=None):
  return tasks.experiment_config(
      "classification", arg, paper={},
      data=dict(),
      settings=dict(), model=dict(num_classes=700))
