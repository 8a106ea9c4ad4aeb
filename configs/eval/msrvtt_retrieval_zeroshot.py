r"""MSRVTT 1k-A text-to-video retrieval, zero-shot: R@1/5/10 [unverified] (paper's table).

Pre-trained checkpoint, no fine-tuning; as mPLUG v1's zero-shot evaluation: 35 tokens, 12
uniformly sampled frames (M1 `configs/retrieval_msrvtt_mplug_large.yaml:9`, datasets.md 3.6).
Spec: shared/spec/mplug2.md sections 6 and 14.

Command:
  python -m mplug2_jax.evaluate --config configs/eval/msrvtt_retrieval_zeroshot.py:data=DATA \
      --checkpoint CKPT [--workdir DIR]   (DATA: built dataset dir; vocab= for another vocab.txt)
"""

from mplug2_jax import experiment


def get_config(arg=None):
  return experiment.eval_experiment(
      "retrieval", arg, paper={},
      data=dict(text_words=40, max_text_len=35, num_frames=12),
      settings=dict(retrieval_k=128))
