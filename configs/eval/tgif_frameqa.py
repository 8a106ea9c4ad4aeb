r"""TGIF-FrameQA video QA: accuracy [unverified] (take it from the paper's table).

Generation: beam 5, 1-10 tokens; exact string match (official code path).
Spec: shared/spec/mplug2.md sections 6 and 14.

Command:
  python -m mplug2_jax.evaluate --config configs/eval/tgif_frameqa.py:data=DATA \
      --checkpoint CKPT [--workdir DIR]   (DATA: built dataset dir; vocab= for another vocab.txt)
"""

from mplug2_jax import experiment


def get_config(arg=None):
  return experiment.eval_experiment(
      "videoqa", arg, paper={},
      data=dict(question_words_eval=50, max_question_len=50),
      settings=dict())
