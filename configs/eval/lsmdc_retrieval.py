r"""LSMDC text-to-video retrieval: R@1/5/10 [unverified] (paper's table).

ITC + ITM re-ranking of the top 128.
Spec: shared/spec/mplug2.md sections 6 and 14.

Command:
  python -m mplug2_jax.evaluate --config configs/eval/lsmdc_retrieval.py:data=DATA \
      --checkpoint CKPT [--workdir DIR]   (DATA: built dataset dir; vocab= for another vocab.txt)
"""

from mplug2_jax import experiment


def get_config(arg=None):
  return experiment.eval_experiment(
      "retrieval", arg, paper={},
      data=dict(text_words=40, max_text_len=40),
      settings=dict(retrieval_k=128))
