r"""MSRVTT-QA with answer-list ranking (official rerank=True path, k_test 128): [unverified]
(the paper's 48.0 is the open-generation number, see msrvtt_qa.py).

Set --config.eval.answer_list=.../msrvtt_qa/train_ans2label.json.
Spec: shared/spec/mplug2.md sections 6 and 14.

Command:
  python -m mplug2_jax.evaluate --config configs/eval/msrvtt_qa_rank.py:data=DATA \
      --checkpoint CKPT [--workdir DIR]   (DATA: built dataset dir; vocab= for another vocab.txt)
"""

from mplug2_jax import experiment


def get_config(arg=None):
  return experiment.eval_experiment(
      "videoqa", arg, paper={},
      data=dict(question_words_eval=50, max_question_len=50),
      settings=dict(qa_mode='rank', k_test=128, answer_list=''))
