r"""RefCOCOg (umd test) visual grounding, Acc@IoU>=0.5: [unverified] (paper's table).

As refcoco.py.
Spec: shared/spec/mplug2.md sections 6 and 14.

Command:
  python -m mplug2_jax.evaluate --config configs/eval/refcocog.py:data=DATA,vocab=VOCAB \
      --checkpoint CKPT [--workdir DIR]   (DATA: built dataset dir, VOCAB: vocab.txt)
"""

from mplug2_jax.evaluate import tasks


def get_config(arg=None):
  return tasks.experiment_config(
      "grounding", arg, paper={},
      data=dict(text_words=20, max_text_len=20, repeat_images=True),
      settings=dict())
