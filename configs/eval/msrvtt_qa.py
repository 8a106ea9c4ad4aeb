r"""MSRVTT-QA open-ended video QA: accuracy **48.0** (paper; repo README, abstract).

Generation: beam 5, 1-10 tokens; exact string match with the gold answer (official).
Spec: shared/spec/mplug2.md sections 6 and 14.

Command:
  python -m mplug2_jax.evaluate --config configs/eval/msrvtt_qa.py:data=DATA \
      --checkpoint CKPT [--workdir DIR]   (DATA: built dataset dir; vocab= for another vocab.txt)
"""

from mplug2_jax import experiment


def get_config(arg=None):
  return experiment.eval_experiment(
      "videoqa", arg, paper={'accuracy': 48.0},
      data=dict(question_words_eval=50, max_question_len=50),
      settings=dict())
