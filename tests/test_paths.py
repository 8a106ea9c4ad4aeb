"""Outputs and inputs on a non-local filesystem: a fake `gs://` bucket served to
etils.epath's fsspec backend by an in-memory filesystem that, like an object store, has no
append mode and no recursive glob. Everything the train loop and the evaluators write or
read besides the orbax arrays (which tensorstore writes through its own GCS driver) goes
through epath: dataset discovery, metrics.jsonl (with resume truncation), TensorBoard
events, the loss PNG, eval outputs, answer lists, model_config.json, run paths."""

from __future__ import annotations

import json
import os

import ml_collections
import pytest
from etils import epath
from etils.epath import backend as backend_lib
from fsspec.implementations.memory import MemoryFileSystem

from mplug2_jax import param_store
from mplug2_jax.data import records
from mplug2_jax.evaluate import runner, videoqa
from mplug2_jax.train import metrics as metrics_lib

BUCKET = "gs://fake-bucket"


class FakeBucket(MemoryFileSystem):
  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise NotImplementedError(f"object stores cannot append ({path})")
    return super()._open(path, mode, **kwargs)


@pytest.fixture
def bucket(monkeypatch, tmp_path):
  FakeBucket.store.clear()
  fs = FakeBucket()
  monkeypatch.setattr(backend_lib.fsspec_backend, "_get_filesystem", lambda name: fs)
  monkeypatch.chdir(tmp_path)  # a path mistaken for a local one would land here
  yield fs
  assert not os.listdir(tmp_path), os.listdir(tmp_path)


def test_find_dataset_walks_a_bucket(bucket):
  for kind in ("video_qa", "image_text"):
    (epath.Path(BUCKET) / "data" / kind / "1.0.0" / "dataset_info.json").parent.mkdir(
        parents=True, exist_ok=True)
  info = epath.Path(BUCKET) / "data" / "video_qa" / "1.0.0" / "dataset_info.json"
  info.write_text("{}")
  assert records.find_dataset(f"{BUCKET}/data/video_qa") == f"{BUCKET}/data/video_qa/1.0.0"
  assert records.find_dataset(f"{BUCKET}/data/video_qa/1.0.0") == f"{BUCKET}/data/video_qa/1.0.0"
  with pytest.raises(FileNotFoundError, match="found none"):
    records.find_dataset(f"{BUCKET}/data/image_text")


def test_metrics_tensorboard_and_plot_in_a_bucket(bucket):
  work = f"{BUCKET}/runs/a"
  writer = metrics_lib.MetricWriter(work)
  for step in range(1, 5):
    writer.write(step, {"loss": 2.0 / step, "loss/itc": 1.0 / step, "lr": 1e-3})
  writer.close()
  assert [r["step"] for r in metrics_lib.read_metrics(work)] == [1, 2, 3, 4]
  writer = metrics_lib.MetricWriter(work, resume_step=2)  # a resumed run drops 3, 4
  writer.write(3, {"loss": 0.5})
  writer.close()
  assert [r["step"] for r in metrics_lib.read_metrics(work)] == [1, 2, 3]
  events = [p for p in (epath.Path(work) / "tb").iterdir() if p.name.startswith("events.")]
  assert events and all(p.stat().length > 100 for p in events)
  from tensorboardX.proto import event_pb2  # the records decode as TensorBoard events
  data = events[0].read_bytes()
  length = int.from_bytes(data[:8], "little")
  event = event_pb2.Event.FromString(data[12:12 + length])
  assert event.file_version.startswith("brain.Event")
  png = metrics_lib.plot_losses(work)
  assert png == f"{work}/loss_curves.png"
  assert epath.Path(png).read_bytes()[:4] == b"\x89PNG"


def test_eval_outputs_and_inputs_in_a_bucket(bucket):
  answers = epath.Path(BUCKET) / "meta" / "answer_list.json"
  answers.parent.mkdir(parents=True, exist_ok=True)
  answers.write_text(json.dumps({"yes": 0, "no": 1}))
  assert videoqa.load_answer_list(str(answers)) == ["yes", "no"]
  config = ml_collections.ConfigDict({"eval": {"submission": True, "split": "test"},
                                      "paper": {"accuracy": 0.5}})
  rows = [{"question_id": 1, "pred_answer": "yes", "_hidden": 0}]
  out = runner.write_outputs(f"{BUCKET}/eval", "videoqa", rows, {"accuracy": 1.0}, config,
                             1.5)
  assert str(out) == f"{BUCKET}/eval"
  assert json.loads((out / "qa_result.json").read_text()) == [{"question_id": 1,
                                                               "pred_answer": "yes"}]
  assert json.loads((out / "vqa_result.json").read_text()) == [{"question_id": 1,
                                                                "answer": "yes"}]
  assert json.loads((out / "metrics.json").read_text())["metrics"] == {"accuracy": 1.0}
  for _ in range(2):  # the grounding log is appended to by rewriting
    runner.write_outputs(f"{BUCKET}/eval", "grounding", [], {"accuracy_iou50": 0.25},
                         config, 1.0)
  assert len((out / "eval_log.txt").read_text().splitlines()) == 2


def test_param_store_paths_stay_urls(bucket):
  assert str(param_store.resolve(f"{BUCKET}/init")) == f"{BUCKET}/init"
  (epath.Path(BUCKET) / "init").mkdir(parents=True, exist_ok=True)
  (epath.Path(BUCKET) / "init" / param_store.MODEL_CONFIG_FILE).write_text(
      json.dumps({"task": "videoqa"}))
  assert param_store.load_model_config(f"{BUCKET}/init").task == "videoqa"
  with pytest.raises(FileNotFoundError, match=f"{BUCKET}/nothing/model_config.json"):
    param_store.load_model_config(f"{BUCKET}/nothing")
