"""Evaluation: one module per task, over the model family's inference (`predict`).

  common.py          settings (`config.eval`), batches, gathering, the `evaluate` driver,
                     `experiment_config` for configs/eval/*.py
  caption.py, videoqa.py, retrieval.py, classification.py, grounding.py
                     each: MODEL_TASK, predict(...) -> this process's rows, score(...)
  metrics.py         the official metrics (COCO caption, VQA, recall, IoU)
  runner.py          one evaluation from a checkpoint: result files, metrics JSON, table
  in_loop.py         the evaluator a training run calls every `eval_every_steps`
  __main__.py        `python -m mplug2_jax.evaluate`
"""
