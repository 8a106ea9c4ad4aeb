r"""VQAv2 test-dev: the paper's number [unverified] (79.3 appears in one third-party
aggregator, not confirmed, so no paper number is printed beside ours).

As M1's VQA (datasets.md 3.4): questions used raw (`pre_question` commented out, M1
`dataset/vqa_dataset.py`), up to 80 tokens; images through the official image test transform
(bicubic resize) as 16-frame clips. Writes vqa_result.json for EvalAI; local VQA accuracy
needs eval.gold_file (val annotations) and normalises as M1's `vqaTools/vqaEval.py:86-96`.
Spec: shared/spec/mplug2.md sections 6 and 14.

Command:
  python -m mplug2_jax.evaluate --config configs/eval/vqav2.py:data=DATA \
      --checkpoint CKPT [--workdir DIR]   (DATA: built dataset dir; vocab= for another vocab.txt)
"""

from mplug2_jax import experiment


def get_config(arg=None):
  return experiment.eval_experiment(
      "videoqa", arg, paper={},
      data=dict(question_preprocess="raw", max_question_len=80, repeat_images=True),
      settings=dict(qa_metric='vqa', vqa_normalization="m1", submission=True, gold_file=''))
