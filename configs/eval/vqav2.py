r"""VQAv2 test-dev: 79.3 appears in one third-party aggregator, not confirmed [unverified].

Writes vqa_result.json for EvalAI; local VQA accuracy needs eval.gold_file (val annotations).
Spec: shared/spec/mplug2.md sections 6 and 14.

Command:
  python -m mplug2_jax.evaluate --config configs/eval/vqav2.py:data=DATA \
      --checkpoint CKPT [--workdir DIR]   (DATA: built dataset dir; vocab= for another vocab.txt)
"""

from mplug2_jax import experiment


def get_config(arg=None):
  return experiment.eval_experiment(
      "videoqa", arg, paper={'vqa_accuracy': 79.3},
      data=dict(question_words_eval=50, max_question_len=80, repeat_images=True),
      settings=dict(qa_metric='vqa', submission=True, gold_file=''))
