r"""Evaluation entry point: one paper result row from a checkpoint.

  python -m mplug2_jax.evaluate --config configs/eval/TASK.py[:data=DIR,vocab=VOCAB.txt] \
      --checkpoint DIR [--workdir DIR] [--config.eval.batch_size=16 ...]

`--checkpoint` is a parameter directory written by `mplug2_jax.convert` or training
(orbax `params/` + `model_config.json`; the latter replaces `config.model`). Writes to
`--workdir` (default: the checkpoint directory's `eval/<config name>`):

  caption         caption_result.json   [{video_id, pred_caption, gold_caption}] (official)
  videoqa         qa_result.json        [{question_id, video_id, pred_answer, gold_answer}]
                  vqa_result.json       [{question_id, answer}] with eval.submission (EvalAI)
  retrieval       retrieval_result.json [{text_index, video_id, top10_videos}]
  classification  classification_result.json [{video_id, label, top5}]
  grounding       grounding_result.json [{id, pred_box, gold_box}] and eval_log.txt
                  {"<split>_set_accuracy": acc} (official line)
  every task      metrics.json {"metrics", "paper", "config", "seconds"}

and prints the metric table beside the paper's numbers. Progress lines come from the
evaluators. Devices: the parameters are sharded over the mesh of `config.mesh` by the
logical rules and every batch is split over its data axes (`eval.batch_size` must divide
by them). Multi-process: every process runs this command; each reads its share of the
split, and process 0 writes the files (padding removed, each example counted once). The
distributed flags (--distributed, --coordinator_address, ...) are those of
`mplug2_jax.distributed`; paths may be local or gs:// (etils.epath).
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from mplug2_jax import cli, distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/eval/TASK.py[:args]",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "parameter directory (params/ + "
                                  "model_config.json)")
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory")
_DISTRIBUTED = distributed.define_flags()
flags.mark_flags_as_required(["config", "checkpoint"])


def main(argv):
  del argv
  from absl import logging

  from mplug2_jax.evaluate import runner

  logging.set_verbosity(logging.WARNING)  # library INFO chatter; progress is printed
  # Multi-process start (TPU pods, GKE, SLURM, explicit flags), then the device check.
  plan = distributed.initialize(_DISTRIBUTED.plan())
  distributed.preflight(_CONFIG.value.mesh, plan)
  runner.run(_CONFIG.value, _CHECKPOINT.value, _WORKDIR.value,
             log=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
  cli.run(main)
