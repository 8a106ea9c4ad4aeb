r"""RefCOCO (testA / testB) visual grounding, Acc@IoU>=0.5: [unverified] (paper's table).

Box tokens as mPLUG v1 ([unused339] prefix, 4 greedy steps over 337 bins); split=testA|testB.
Spec: shared/spec/datasets.md 3.5, shared/spec/mplug2.md sections 6 and 14.

Command:
  python -m mplug2_jax.evaluate --config configs/eval/refcoco.py:data=DATA \
      --checkpoint CKPT [--workdir DIR]   (DATA: built dataset dir; vocab= for another vocab.txt)
"""

from mplug2_jax import experiment


def get_config(arg=None):
  return experiment.eval_experiment(
      "grounding", arg, paper={},
      # Official test geometry and query length (data/grounding.py, datasets.md 3.5):
      # letterboxed into model.image_size (336), ImageNet mean/std, 20 tokens.
      data=dict(max_text_len=20, repeat_images=True, grounding_eval_norm="imagenet"),
      settings=dict())
