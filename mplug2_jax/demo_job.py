r"""The README main job: demo data -> tiny pretraining -> fine-tuning -> evaluation table.

  python -m mplug2_jax.demo_job --workdir workdirs/demo

On 2 CPU cores, about 12 minutes (figures in docs/training.md; the Owl2 stage ~4 of them):
  1. the embedded demo dataset (`mplug2_jax.data.demo`) in WORKDIR/data, unless present;
  2. pretraining of the tiny model, ITC + ITM + MLM + captioning (`configs/demo.py`),
     in WORKDIR/pretrain;
  3. fine-tuning from it for captioning (WORKDIR/caption), video QA (WORKDIR/videoqa) and
     classification of the motion direction (WORKDIR/classification);
  4. evaluation on the held-out split (`configs/eval/demo.py`) of the trained models and
     of the untrained (randomly initialised) model: text-to-video retrieval (zero-shot
     from the pretrained model), captioning, QA and classification;
  5. mPLUG-Owl2: the instruction demo data (`mplug2_jax.data.demo_instruction`) in
     WORKDIR/owl2_data, instruction tuning of the tiny Owl2 from scratch
     (`configs/owl2_sft.py:tiny`, abstractor kernels initialised at std
     OWL2_ABSTRACTOR_INIT_STD) in WORKDIR/owl2, greedy answers to the held-out questions
     of the trained and the untrained model (`evaluate/owl2_bench.py`): open answers
     (exact match) and multiple choice (letter); chance = uniform guessing among the
     answers of the question type / the options;
  6. the table, printed and written to WORKDIR/results.md (+ results.json), beside chance:
     retrieval R@K = K / number of videos; captioning = a random training caption per
     test video, scored the same way; QA / classification = the majority training answer /
     label.

Every stage is resumable: a finished stage (its exported params/) is skipped, an
interrupted training resumes from its last checkpoint.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import random
import sys
import time

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "everything goes here")
_DATA = flags.DEFINE_string("data", "", "demo dataset dir (default WORKDIR/data; built if "
                            "missing)")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 0, "0 = configs/demo.py default")
_FINETUNE_STEPS = flags.DEFINE_integer("finetune_steps", 0, "0 = configs/demo.py default")
_OWL2_STEPS = flags.DEFINE_integer("owl2_steps", 0, "0 = OWL2_STEPS (the Owl2 stage)")

REPO = pathlib.Path(__file__).resolve().parent.parent
TRAIN_CONFIG = REPO / "configs" / "demo.py"
EVAL_CONFIG = REPO / "configs" / "eval" / "demo.py"
# The Owl2 stage: steps and batch of the tiny instruction tuning, and its rows
# (label, metric key of `owl2_bench.score_demo`, chance key).
OWL2_STEPS, OWL2_BATCH, OWL2_TRAIN, OWL2_TEST = 600, 16, 2048, 384
# From scratch, the official N(0, 0.02) abstractor kernels leave its output almost blind to
# the image (2e-4 variation across images against a magnitude of 0.09: the normalised
# queries' residual dominates). About 1/sqrt(width) for the tiny abstractor's width 32
# lets the image through: docs/training.md section 6.
OWL2_ABSTRACTOR_INIT_STD = 0.2
OWL2_ROWS = (("Owl2 open-answer accuracy", "open/accuracy", "open/chance"),
             ("Owl2 multiple-choice accuracy", "choice/accuracy", "choice/chance"))
# (row label, eval task, metric key, trained model's stage)
ROWS = (("text-to-video R@1", "retrieval", "t2v_R1", "pretrain"),
        ("text-to-video R@5", "retrieval", "t2v_R5", "pretrain"),
        ("text-to-video R@10", "retrieval", "t2v_R10", "pretrain"),
        ("caption BLEU-4", "caption", "Bleu_4", "caption"),
        ("caption CIDEr", "caption", "CIDEr", "caption"),
        ("QA accuracy", "videoqa", "accuracy", "videoqa"),
        ("direction top-1", "classification", "top1", "classification"))


def load_config(path: pathlib.Path, arg: str):
  """`get_config(arg)` of a config file (as `--config path:arg` would)."""
  from mplug2_jax import experiment

  return experiment.load(f"{path}:{arg}")


def is_exported(directory: pathlib.Path) -> bool:
  from mplug2_jax import param_store

  return (directory / param_store.MODEL_CONFIG_FILE).exists() and (
      directory / param_store.PARAMS_DIR).exists()


# --------------------------------------------------------------------------------------
# Stages.
# --------------------------------------------------------------------------------------


def train_stage(work: pathlib.Path, data: str, task: str, init: str, steps: int) -> pathlib.Path:
  from mplug2_jax import experiment
  from mplug2_jax.evaluate import in_loop
  from mplug2_jax.train import loop

  out = work / task
  if is_exported(out):
    print(f"== {task}: already trained ({out})", flush=True)
    return out
  arg = f"data={data},task={task}" + (f",init={init}" if init else "") + (
      f",steps={steps}" if steps else "")
  config = load_config(TRAIN_CONFIG, arg)
  experiment.validate(config)
  print(f"== {task}: training {config.total_steps} steps -> {out}", flush=True)
  start = time.time()
  summary = loop.train(config, str(out), evaluator=in_loop.make_evaluator(config))
  if summary["status"] != "done":
    raise RuntimeError(f"{task} training stopped ({summary['status']}) at step "
                       f"{summary['step']}; rerun to resume")
  print(f"== {task}: done in {time.time() - start:.0f}s; loss curves {summary['plot']}",
        flush=True)
  return out


def untrained_checkpoint(work: pathlib.Path, data: str, task: str = "pretrain") -> pathlib.Path:
  """The randomly initialised model of `task` (seed of configs/demo.py), exported. The
  pretraining model serves retrieval, captioning and QA; classification has its own head."""
  import jax
  import flax.linen as nn

  from mplug2_jax import param_store
  from mplug2_jax.models import registry

  out = work / ("untrained" if task == "pretrain" else f"untrained_{task}")
  if not is_exported(out):
    config = load_config(TRAIN_CONFIG, f"data={data},task={task}")
    family = registry.of(config.model)
    variables = jax.jit(family.build(config.model).init)(
        {"params": jax.random.key(config.seed), "dropout": jax.random.key(config.seed)},
        family.init_batch(config.model))
    param_store.save_params(out, nn.meta.unbox(variables["params"]), config.model)
  return out


def evaluate_stage(work: pathlib.Path, data: str, name: str, task: str,
                   checkpoint: pathlib.Path) -> dict:
  from mplug2_jax.evaluate import runner as evaluate

  out = work / "eval" / name / task
  done = out / "metrics.json"
  if done.exists() and done.stat().st_mtime >= (checkpoint / "model_config.json").stat().st_mtime:
    return json.loads(done.read_text())["metrics"]
  print(f"== evaluating {name} {task} ({checkpoint})", flush=True)
  config = load_config(EVAL_CONFIG, f"task={task},data={data}")
  _, metrics = evaluate.run(config, str(checkpoint), str(out), log=lambda m: print(m, flush=True))
  return metrics


def owl2_stage(work: pathlib.Path, steps: int = 0) -> list[tuple[str, float, float, float]]:
  """The Owl2 rows: instruction demo data, tiny instruction tuning from scratch, greedy
  answers of the trained and the untrained model to the held-out questions."""
  import flax.linen as nn
  import jax

  from mplug2_jax import experiment, param_store
  from mplug2_jax.data import demo_instruction, spm
  from mplug2_jax.evaluate import owl2_bench
  from mplug2_jax.models import registry
  from mplug2_jax.train import loop

  data_dir = work / "owl2_data"
  if not (data_dir / "tokenizer.model").exists():
    print(f"== Owl2 instruction demo data -> {data_dir}", flush=True)
    demo_instruction.make_demo(str(data_dir), OWL2_TRAIN, OWL2_TEST)
  dataset = data_dir / "instruction" / "mplug2_records" / "instruction" / "1.0.0"
  vocab = data_dir / "tokenizer.model"
  config = load_config(REPO / "configs" / "owl2_sft.py",
                       f"tiny,data={dataset},vocab={vocab},steps={steps or OWL2_STEPS},"
                       f"batch={OWL2_BATCH}")
  config.model.abstractor.init_std = OWL2_ABSTRACTOR_INIT_STD
  config.checkpoint.every_steps = config.total_steps
  config.log_every_steps = max(1, config.total_steps // 10)
  experiment.validate(config)
  trained, untrained = work / "owl2", work / "owl2_untrained"
  if is_exported(trained):
    print(f"== owl2: already trained ({trained})", flush=True)
  else:
    print(f"== owl2: instruction tuning {config.total_steps} steps -> {trained}", flush=True)
    summary = loop.train(config, str(trained))
    if summary["status"] != "done":
      raise RuntimeError(f"owl2 training stopped ({summary['status']}); rerun to resume")
  if not is_exported(untrained):
    family = registry.of(config.model)
    variables = jax.jit(family.build(config.model).init)(
        {"params": jax.random.key(config.seed)}, family.init_batch(config.model))
    param_store.save_params(untrained, nn.meta.unbox(variables["params"]), config.model)
  questions = data_dir / "raw" / "questions_test.jsonl"
  examples, golds = owl2_bench.read_gold("demo_jsonl", [str(questions)])
  tokenizer = spm.SentencePieceTokenizer(str(vocab))
  scores = {}
  for name, checkpoint in (("trained", trained), ("untrained", untrained)):
    out = work / "eval" / name / "owl2" / "metrics.json"
    if out.exists() and out.stat().st_mtime >= (checkpoint / "model_config.json").stat().st_mtime:
      scores[name] = json.loads(out.read_text())["metrics"]
      continue
    print(f"== evaluating {name} owl2 ({checkpoint})", flush=True)
    preds = owl2_bench.predict(config.model, param_store.load_params(checkpoint), examples,
                               fmt="vqa", tokenizer=tokenizer,
                               image_root=str(data_dir / "raw" / "images"),
                               max_new_tokens=4, batch_size=16, length=160,
                               style="vicuna_v1")
    scores[name] = owl2_bench.score_demo(preds, golds)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"metrics": scores[name], "predictions": preds}, indent=1))
  return [(label, scores["trained"][key], scores["untrained"][key], scores["trained"][base])
          for label, key, base in OWL2_ROWS]


# --------------------------------------------------------------------------------------
# Chance baselines.
# --------------------------------------------------------------------------------------


def chance(data: str, eval_metrics: dict) -> dict:
  """{(task, metric): value} of the chance baselines described in the module docstring."""
  from mplug2_jax.data import sources
  from mplug2_jax.evaluate import metrics

  read = lambda name: sources.read_annotations(os.path.join(data, "raw", name))

  def majority_accuracy(key: str, train: str, test: str) -> float:
    """Accuracy of always answering the most frequent training `key`."""
    majority = collections.Counter(r[key] for r in read(train)).most_common(1)[0][0]
    golds = [r[key] for r in read(test)]
    return metrics.exact_match_accuracy([majority] * len(golds), golds)

  out = {}
  num_videos = eval_metrics["retrieval"]["num_videos"]
  for k in (1, 5, 10):
    out[("retrieval", f"t2v_R{k}")] = 100.0 * min(k, num_videos) / num_videos
  train_captions = [c for r in read("video_caption_train.jsonl")
                    for c in ([r["caption"]] if isinstance(r["caption"], str) else r["caption"])]
  test = read("video_caption_test.jsonl")
  pick = random.Random(0)
  scores = metrics.caption_metrics(
      {str(i): pick.choice(train_captions) for i in range(len(test))},
      {str(i): r["golden_captions"] for i, r in enumerate(test)})
  out[("caption", "Bleu_4")], out[("caption", "CIDEr")] = scores["Bleu_4"], scores["CIDEr"]
  out[("videoqa", "accuracy")] = majority_accuracy("answer", "video_qa_train.jsonl",
                                                   "video_qa_test.jsonl")
  out[("classification", "top1")] = majority_accuracy(
      "label", "video_classification_train.csv", "video_classification_test.csv")
  return out


# --------------------------------------------------------------------------------------
# The table.
# --------------------------------------------------------------------------------------


def table(trained: dict, untrained: dict, baseline: dict) -> list[tuple[str, float, float, float]]:
  return [(label, trained[task][key], untrained[task][key], baseline[(task, key)])
          for label, task, key, _ in ROWS]


def markdown(rows, wall: float, work: pathlib.Path) -> str:
  lines = ["# mPLUG-2 and mPLUG-Owl2 tiny on the demo datasets: held-out results", "",
           "| metric | trained | untrained | chance |", "|---|---:|---:|---:|"]
  lines += [f"| {label} | {a:.2f} | {b:.2f} | {c:.2f} |" for label, a, b, c in rows]
  lines += ["", "Recall in %, QA accuracy and top-1 in %, BLEU-4 and CIDEr as pycocoevalcap reports them "
            "(fractions). Chance: R@K = K / videos; captioning = a random training caption per "
            "test video; QA / classification = the majority training answer / label; Owl2 = "
            "uniform guessing among the answers of the question type / the options.", "",
            f"Wall time of the job: {wall / 60:.1f} min. Loss curves: "
            f"`{work / 'pretrain' / 'loss_curves.png'}` (pretraining), "
            f"`{work / 'caption' / 'loss_curves.png'}`, `{work / 'videoqa' / 'loss_curves.png'}`, "
            f"`{work / 'classification' / 'loss_curves.png'}`."]
  return "\n".join(lines) + "\n"


def run(work: pathlib.Path, data: str = "", pretrain_steps: int = 0,
        finetune_steps: int = 0, owl2_steps: int = 0) -> list:
  from mplug2_jax.data import demo

  start = time.time()
  work.mkdir(parents=True, exist_ok=True)
  data = os.path.abspath(data or str(work / "data"))
  if not os.path.isdir(os.path.join(data, "video_qa")):
    print(f"== demo dataset -> {data}", flush=True)
    demo.make_demo(data)
  pre = train_stage(work, data, "pretrain", "", pretrain_steps)
  stages = {"pretrain": pre,
            "caption": train_stage(work, data, "caption", str(pre), finetune_steps),
            "videoqa": train_stage(work, data, "videoqa", str(pre), finetune_steps),
            "classification": train_stage(work, data, "classification", str(pre),
                                          finetune_steps)}
  trained_metrics, untrained_metrics = {}, {}
  for task, stage in (("retrieval", "pretrain"), ("caption", "caption"),
                      ("videoqa", "videoqa"), ("classification", "classification")):
    untrained = untrained_checkpoint(work, data, "classification" if stage == "classification"
                                     else "pretrain")
    trained_metrics[task] = evaluate_stage(work, data, "trained", task, stages[stage])
    untrained_metrics[task] = evaluate_stage(work, data, "untrained", task, untrained)
  rows = table(trained_metrics, untrained_metrics, chance(data, trained_metrics))
  rows += owl2_stage(work, owl2_steps)
  wall = time.time() - start
  width = max(len(r[0]) for r in rows)
  print(f"\n{'metric':<{width}}  {'trained':>9}  {'untrained':>9}  {'chance':>9}")
  for label, a, b, c in rows:
    print(f"{label:<{width}}  {a:>9.2f}  {b:>9.2f}  {c:>9.2f}")
  (work / "results.md").write_text(markdown(rows, wall, work))
  (work / "results.json").write_text(json.dumps(
      {"rows": [dict(metric=r[0], trained=r[1], untrained=r[2], chance=r[3]) for r in rows],
       "trained": trained_metrics, "untrained": untrained_metrics, "wall_seconds": wall},
      indent=1))
  print(f"\nresults: {work / 'results.md'} ({wall / 60:.1f} min)", flush=True)
  return rows


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # library INFO chatter; progress is printed
  run(pathlib.Path(_WORKDIR.value).absolute(), _DATA.value, _PRETRAIN_STEPS.value,
      _FINETUNE_STEPS.value, _OWL2_STEPS.value)


if __name__ == "__main__":
  app.run(main, argv=sys.argv)
