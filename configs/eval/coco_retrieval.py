r"""MSCOCO (5k test) image-text retrieval: R@1/5/10 [unverified] (paper's table).

Every caption of each image (eval.all_texts); as M1's image retrieval: ITM re-ranks the ITC
top 256 and the re-ranked score is the ITM logit alone (M1 `retrieval_img_mplug.py:153-154`).
Spec: shared/spec/mplug2.md sections 6 and 14.

Command:
  python -m mplug2_jax.evaluate --config configs/eval/coco_retrieval.py:data=DATA \
      --checkpoint CKPT [--workdir DIR]   (DATA: built dataset dir; vocab= for another vocab.txt)
"""

from mplug2_jax import experiment


def get_config(arg=None):
  return experiment.eval_experiment(
      "retrieval", arg, paper={},
      data=dict(text_words=30, max_text_len=30, repeat_images=True),
      settings=dict(retrieval_k=256, rerank_add_itc=False, all_texts=True))
