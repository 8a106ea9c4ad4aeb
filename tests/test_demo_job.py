"""The README main job (`python -m mplug2_jax.demo_job`): the chain of stages on a small
demo dataset with a few steps each, its chance baselines and its table."""

import json
import os

import numpy as np
import pytest

from mplug2_jax import demo_job
from mplug2_jax.data import demo
from mplug2_jax.train import metrics as metrics_lib


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo_job")
  demo.make_demo(str(root / "data"), num_train=12, num_test=4, size=32, frames=8,
                 log=lambda *_: None)
  return root


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_chance_baselines_hand_checked(tmp_path):
  raw = tmp_path / "raw"
  raw.mkdir()
  _write_jsonl(raw / "video_caption_train.jsonl",
               [{"video_id": "a", "caption": "a red circle moves up"}])
  _write_jsonl(raw / "video_caption_test.jsonl",
               [{"video_id": "t0", "golden_captions": ["a red circle moves up"]},
                {"video_id": "t1", "golden_captions": ["a blue square moves down"]}])
  _write_jsonl(raw / "video_qa_train.jsonl", [
      {"video_id": "a", "question": "q", "answer": x} for x in ("red", "up", "up", "circle")])
  _write_jsonl(raw / "video_qa_test.jsonl", [
      {"video_id": "t0", "question": "q", "answer": x} for x in ("up", "red", "left", "up")])
  header = "label,youtube_id,time_start,time_end,split\n"
  (raw / "video_classification_train.csv").write_text(header + "left,a,0,2,train\n" * 3
                                                      + "up,b,0,2,train\n")
  (raw / "video_classification_test.csv").write_text(header + "left,c,0,2,test\n"
                                                     + "up,d,0,2,test\n" * 3)
  got = demo_job.chance(str(tmp_path), {"retrieval": {"num_videos": 20.0}})
  assert got[("classification", "top1")] == pytest.approx(25.0)  # "left": 1 of 4
  assert got[("retrieval", "t2v_R1")] == pytest.approx(5.0)
  assert got[("retrieval", "t2v_R5")] == pytest.approx(25.0)
  assert got[("retrieval", "t2v_R10")] == pytest.approx(50.0)
  assert got[("videoqa", "accuracy")] == pytest.approx(50.0)   # majority "up": 2 of 4
  # The only training caption: exact for t0, no 4-gram overlap for t1.
  assert 0.0 < got[("caption", "CIDEr")] and 0.0 <= got[("caption", "Bleu_4")] < 1.0


def test_table_rows_and_markdown(tmp_path):
  trained = {"retrieval": {"t2v_R1": 30.0, "t2v_R5": 60.0, "t2v_R10": 80.0},
             "caption": {"Bleu_4": 0.5, "CIDEr": 2.0}, "videoqa": {"accuracy": 70.0},
             "classification": {"top1": 90.0}}
  untrained = {"retrieval": {"t2v_R1": 2.0, "t2v_R5": 10.0, "t2v_R10": 20.0},
               "caption": {"Bleu_4": 0.0, "CIDEr": 0.0}, "videoqa": {"accuracy": 0.0},
               "classification": {"top1": 25.0}}
  chance = {("retrieval", "t2v_R1"): 2.1, ("retrieval", "t2v_R5"): 10.4,
            ("retrieval", "t2v_R10"): 20.8, ("caption", "Bleu_4"): 0.2,
            ("caption", "CIDEr"): 0.6, ("videoqa", "accuracy"): 11.1,
            ("classification", "top1"): 27.0}
  rows = demo_job.table(trained, untrained, chance)
  assert rows[0] == ("text-to-video R@1", 30.0, 2.0, 2.1)
  assert rows[-2] == ("QA accuracy", 70.0, 0.0, 11.1)
  assert rows[-1] == ("direction top-1", 90.0, 25.0, 27.0)
  md = demo_job.markdown(rows, 600.0, tmp_path)
  assert "| text-to-video R@1 | 30.00 | 2.00 | 2.10 |" in md
  assert "10.0 min" in md


@pytest.mark.slow  # ~4 min on 2 cores: 3 trainings, 10 evaluations (the README job runs it all)
def test_the_chain_runs_end_to_end_and_resumes(small_demo, capsys):
  """Pretraining, two fine-tunings, six evaluations and the table; a rerun skips every
  finished stage and reuses the evaluations (same numbers)."""
  work = small_demo / "work"
  data = str(small_demo / "data")
  rows = demo_job.run(work, data, pretrain_steps=3, finetune_steps=2, owl2_steps=2)
  out = capsys.readouterr().out
  assert "== pretrain: training 3 steps" in out and "== videoqa: training 2 steps" in out
  assert [r[0] for r in rows] == ([r[0] for r in demo_job.ROWS]
                                  + [r[0] for r in demo_job.OWL2_ROWS])
  for _, trained, untrained, chance in rows:
    assert np.isfinite([trained, untrained, chance]).all()
  results = json.loads((work / "results.json").read_text())
  assert results["trained"]["retrieval"]["num_videos"] == 4
  assert results["trained"]["videoqa"]["num"] == 12         # 3 questions per test clip
  assert results["trained"]["classification"]["num"] == 4
  assert "| QA accuracy |" in (work / "results.md").read_text()
  for stage in ("pretrain", "caption", "videoqa", "classification"):
    assert os.path.exists(work / stage / "loss_curves.png")
    assert demo_job.is_exported(work / stage)
  # Fine-tuning evaluates in the loop (every total // 2 steps) and keeps the best.
  for stage, metric in (("caption", "eval/CIDEr"), ("videoqa", "eval/accuracy"),
                        ("classification", "eval/top1")):
    evals = [r for r in metrics_lib.read_metrics(str(work / stage)) if metric in r]
    assert [r["step"] for r in evals] == [1, 2], stage
  assert "step 2/2 | eval" in out

  again = demo_job.run(work, data, pretrain_steps=3, finetune_steps=2, owl2_steps=2)
  out = capsys.readouterr().out
  assert "already trained" in out and "== evaluating" not in out
  assert again == rows


@pytest.mark.slow  # ~2 min on 2 cores: one tiny Owl2 training, two greedy evaluations
def test_owl2_stage_rows(tmp_path, capsys):
  rows = demo_job.owl2_stage(tmp_path, steps=2)
  assert [r[0] for r in rows] == [r[0] for r in demo_job.OWL2_ROWS]
  for _, trained, untrained, chance in rows:
    assert 0.0 <= min(trained, untrained) and max(trained, untrained) <= 100.0
    assert 20.0 < chance < 40.0  # 3-4 answers per question type / options
  assert "== owl2: instruction tuning 2 steps" in capsys.readouterr().out
  assert demo_job.owl2_stage(tmp_path, steps=2) == rows  # resumed: nothing recomputed
