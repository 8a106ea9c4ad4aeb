"""Reliability and security: nothing runs from data, nothing is read outside the media
roots, nothing damaged is used silently, every bad input is named and counted.

Fast cases (no model is compiled); the end-to-end faults of a training run are in
`python -m mplug2_jax.train.faults` (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import resource
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mplug2_jax import experiment, param_store
from mplug2_jax.config_lib import ConfigError
from mplug2_jax.data import build, demo, media, records, sources
from mplug2_jax.data import text as text_lib
from mplug2_jax.data.bad_data import BadDataCounter
from mplug2_jax.train import checkpointing, metrics as metrics_lib


@pytest.fixture(scope="module")
def clip():
  return demo.render_clip(np.random.default_rng(0), "red", "circle", "left", 32, 8)


@pytest.fixture(scope="module")
def media_root(tmp_path_factory, clip):
  root = tmp_path_factory.mktemp("media")
  (root / "v0.mp4").write_bytes(demo.encode_mp4(clip))
  (root / "v1.mp4").write_bytes(demo.encode_mp4(clip))
  (root / "a.jpg").write_bytes(demo.encode_jpeg(clip[0]))
  return root


def _jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def _build(kind, tmp_path, ann, root, **kw):
  log: list[str] = []
  out = build.build(kind, str(tmp_path / "ds"), {"train": [ann]}, str(root), log=log.append,
                    **kw)
  src = records.RecordSource(out, "train")
  return [src[i] for i in range(len(src))], "\n".join(log)


class _Alarm:
  """Fails the test instead of hanging it (a FIFO opened for reading blocks)."""

  def __enter__(self):
    def handler(*_):
      raise TimeoutError("blocked: the build opened something that never answers")
    self.previous = signal.signal(signal.SIGALRM, handler)
    signal.alarm(20)

  def __exit__(self, *_):
    signal.alarm(0)
    signal.signal(signal.SIGALRM, self.previous)


# --------------------------------------------------------------------------------------
# 1. No code execution from annotation files.
# --------------------------------------------------------------------------------------


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_malicious_pth_runs_nothing_and_names_the_file(tmp_path, media_root):
  torch = pytest.importorskip("torch")
  marker = tmp_path / "PWNED"
  evil = tmp_path / "refcoco_train.pth"
  torch.save([("a.jpg", "x", [1, 2, 3, 4], _Exploit(marker), "y")], str(evil))
  with pytest.raises(ValueError, match=f"{evil}: refused to unpickle"):
    build.build("grounding", str(tmp_path / "ds"), {"train": [str(evil)]}, str(media_root),
                log=lambda *_: None)
  assert not marker.exists()
  # The command line: one line on stderr, exit status 1, still nothing ran.
  with pytest.raises(SystemExit) as e:
    build.main(["--kind=grounding", f"--out={tmp_path / 'ds2'}", f"--annotations={evil}",
                f"--videos={media_root}"])
  assert e.value.code == 1 and not marker.exists()


def test_plain_pth_annotations_still_load(tmp_path, media_root):
  torch = pytest.importorskip("torch")
  ann = tmp_path / "split.pth"
  torch.save([("a.jpg", "a.jpg", [1.0, 2.0, 10.0, 20.0], "the red circle", None),
              ("a.jpg", "a.jpg", np.array([0.0, 0.0, 5.0, 5.0]), "left thing", None)], str(ann))
  recs, _ = _build("grounding", tmp_path, str(ann), media_root)
  assert sorted(r["texts"][0] for r in recs) == [b"left thing", b"the red circle"]
  box = next(r["box"] for r in recs if r["texts"][0] == b"the red circle")
  np.testing.assert_array_equal(box, [1, 2, 11, 22])  # xywh -> xyxy


# --------------------------------------------------------------------------------------
# 2. Media paths stay inside their root and are regular files.
# --------------------------------------------------------------------------------------


def test_media_paths_outside_the_root_are_refused(tmp_path, media_root, clip):
  root = tmp_path / "videos"
  root.mkdir()
  (root / "ok.mp4").write_bytes((media_root / "v0.mp4").read_bytes())
  secret = tmp_path / "secret.mp4"
  secret.write_bytes(b"SECRET" + demo.encode_mp4(clip))
  (root / "link.mp4").symlink_to(secret)                # a symlink pointing out
  os.mkfifo(root / "pipe.mp4")                           # would block an open()
  (root / "inner.mp4").symlink_to(root / "ok.mp4")      # a symlink inside: fine
  rows = [{"video_id": str(secret), "caption": "absolute path"},
          {"video_id": "../secret.mp4", "caption": "dot-dot escape"},
          {"video_id": "../" * 12 + "etc/passwd", "caption": "deep escape"},
          {"video_id": "link.mp4", "caption": "symlink out"},
          {"video_id": "pipe.mp4", "caption": "a fifo"},
          {"video_id": "ok.mp4", "caption": "good"},
          {"video_id": "inner.mp4", "caption": "good link"}]
  ann = _jsonl(tmp_path / "a.jsonl", rows)
  with _Alarm():  # --no_verify: the bytes would be stored unchecked
    recs, log = _build("video_text", tmp_path, ann, root, verify=False, max_bad_fraction=1.0)
  assert sorted(r["texts"][0] for r in recs) == [b"good", b"good link"]
  assert all(b"SECRET" not in r["media"] for r in recs)
  assert "'outside_root': 4" in log and "'not_a_file': 1" in log, log


def test_media_reader_counts_each_reason(tmp_path):
  root = tmp_path / "r"
  root.mkdir()
  (root / "dir.mp4").mkdir()
  counter = BadDataCounter(1.0)
  read = sources.MediaReader(counter, verify=False, roots=[str(root)])
  assert read(str(root / "dir.mp4"), "d") is None
  assert read("/etc/hostname", "abs") is None
  assert read(str(root / "none.mp4"), "m") is None
  assert dict(counter.counts) == {"not_a_file": 1, "outside_root": 1, "missing": 1}


# --------------------------------------------------------------------------------------
# 5, 7. Bad annotations counted with file, line and record id; degenerate text and time.
# --------------------------------------------------------------------------------------


def test_bad_annotation_records_are_counted_with_file_and_line(tmp_path, media_root):
  rows = [{"video_id": "v0.mp4", "caption": "fine"},
          {"video": "v1.mp4", "caption": "the retrieval field name"},
          "{not json",
          {"caption": "no video"},
          {"video_id": "v0.mp4", "caption": 12345},
          {"video_id": "v0.mp4", "caption": "x", "start_time": "abc"},
          '{"video_id": "v0.mp4", "caption": "\\ud800 lone surrogate"}',
          {"video_id": "v0.mp4", "caption": "\x00\u200b"},
          {"video_id": "v0.mp4", "caption": "late", "start_time": 999.0}]
  ann = _jsonl(tmp_path / "pre.jsonl", rows)
  recs, log = _build("video_text", tmp_path, ann, media_root, max_bad_fraction=1.0)
  assert sorted(r["texts"][0] for r in recs) == [b"fine", b"the retrieval field name"]
  assert "'bad_annotation': 5" in log and "'empty_text': 1" in log, log
  assert "'time_out_of_range': 1" in log, log
  assert f"{ann}:3: not JSON" in log
  assert f"{ann}:4: bad_annotation missing field 'video_id'" in log
  assert f"{ann}:5: bad_annotation record 'v0.mp4': field 'caption' must be a string" in log
  assert f"{ann}:6:" in log and "'start_time' must be a number" in log
  assert f"{ann}:7:" in log and "lone surrogate" in log


def test_too_many_bad_annotations_still_fail_the_build(tmp_path, media_root):
  ann = _jsonl(tmp_path / "a.jsonl", [{"video_id": "v0.mp4", "caption": 1}] * 3
               + [{"video_id": "v0.mp4", "caption": "ok"}])
  with pytest.raises(Exception, match=r"3 of 4 train records are bad.*bad_annotation"):
    _build("video_text", tmp_path, ann, media_root, max_bad_fraction=0.5)


def test_blank_text_and_window_outside_the_clip(clip):
  assert text_lib.is_blank("\x00\u200b \t") and not text_lib.is_blank("\x00a")
  data = demo.encode_mp4(clip)  # 8 frames at 8 fps: 1 s
  with pytest.raises(media.BadSample) as e:
    media.decode_video(data, 4, "middle", None, window=(5.0, 6.0))
  assert e.value.reason == "time_out_of_range"
  assert media.decode_video(data, 4, "middle", None, window=(0.5, 1.0)).shape[0] == 4


# --------------------------------------------------------------------------------------
# 6. A replaced bad sample never repeats a record within a training batch.
# --------------------------------------------------------------------------------------


def test_replacements_never_duplicate_a_record_in_a_batch(tmp_path, media_root):
  from mplug2_jax.data import default_data_config, pipeline
  import ml_collections

  mp4 = (media_root / "v0.mp4").read_bytes()
  recs = [dict(id=f"good{i}", media=mp4, media_format="mp4", texts=[b"a red circle"])
          for i in range(9)]
  recs[1] = dict(id="bad_blank", media=mp4, media_format="mp4", texts=["\x00\u200b".encode()])
  recs[4] = dict(id="bad_media", media=b"\x00" * 64, media_format="mp4", texts=[b"x"])
  out = records.write(str(tmp_path / "bad"), "video_caption", {"train": lambda: recs})
  d = default_data_config()
  d.vocab_file = str(text_lib.BERT_VOCAB_FILE)
  d.mixture = ((out, 1.0),)
  d.max_bad_fraction, d.bad_min_samples = 0.5, 0
  model = ml_collections.ConfigDict(dict(name="mplug2", task="caption", num_frames=2,
                                         image_size=32))
  it = pipeline.make_iterator(d, split="train", batch_size=3, model_cfg=model, seed=0)
  for _ in range(3):
    next(it)
    ids = [m["id"] for m in it.last_meta]
    assert len(set(ids)) == len(ids), ids
    assert not any(i.startswith("bad") for i in ids)
  m = it.metrics()
  assert m["data/bad/empty_text"] == 1 and m["data/bad/total"] == 2


# --------------------------------------------------------------------------------------
# 3, 10. Checkpoints: verified on restore, fallback or fail, finite, named files.
# --------------------------------------------------------------------------------------


class _Iterator:
  def __init__(self, position=0):
    self.position = position

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


def _tree(value):
  return {"w": jnp.full((64, 64), value, jnp.float32), "b": jnp.arange(8, dtype=jnp.int32)}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


def _config(**kw):
  c = checkpointing.default_checkpoint_config()
  c.update(dict(dict(every_steps=1, keep=3, keep_best=0), **kw))
  return c


def _two_checkpoints(directory):
  ckpt = checkpointing.Checkpoints(str(directory), _config())
  for step in (1, 2):
    ckpt.save(step, _tree(float(step)), _Iterator(step))
    ckpt.wait()
  ckpt.close()


def _flip_bytes(step_dir, n=64):
  """Flips `n` bytes in the middle of the largest array-data file of the state."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
  target = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  mid = len(data) // 2
  for i in range(mid, min(mid + n, len(data))):
    data[i] ^= 0xFF
  target.write_bytes(bytes(data))
  return target


def test_flipped_bytes_fall_back_to_the_previous_checkpoint(tmp_path):
  directory = tmp_path / "ckpt"
  _two_checkpoints(directory)
  _flip_bytes(directory / "2")
  ckpt = checkpointing.Checkpoints(str(directory), _config())
  it = _Iterator()
  state, step = ckpt.restore(_abstract(_tree(0.0)), it)
  ckpt.close()
  assert step == 1 and it.position == 1
  np.testing.assert_array_equal(state["w"], np.full((64, 64), 1.0, np.float32))
  assert ckpt.all_steps() == [1]  # the damaged one is set aside, not deleted
  assert [p.name.split("-")[0] for p in (tmp_path / "ckpt.unusable").iterdir()] == ["2"]


def test_flipped_bytes_fail_by_config_naming_the_checkpoint(tmp_path):
  directory = tmp_path / "ckpt"
  _two_checkpoints(directory)
  _flip_bytes(directory / "2")
  ckpt = checkpointing.Checkpoints(str(directory), _config(on_corrupt="fail"))
  with pytest.raises(checkpointing.CorruptCheckpointError, match=f"{directory / '2'}"):
    ckpt.restore(_abstract(_tree(0.0)), _Iterator())
  ckpt.close()


def test_digest_mismatch_is_detected(tmp_path):
  """Damage that still decodes (the manifest disagrees with the arrays)."""
  directory = tmp_path / "ckpt"
  _two_checkpoints(directory)
  manifest = directory / "2" / checkpointing.DIGESTS / "metadata"
  text = manifest.read_text()
  saved = json.loads(text)
  saved["leaves"]["w"][0] += 1
  manifest.write_text(json.dumps(saved))
  ckpt = checkpointing.Checkpoints(str(directory), _config(on_corrupt="fail"))
  with pytest.raises(checkpointing.CorruptCheckpointError, match="differ from the digest"):
    ckpt.restore(_abstract(_tree(0.0)), _Iterator())
  ckpt.close()


def test_non_finite_checkpoint_is_not_restored(tmp_path):
  ckpt = checkpointing.Checkpoints(str(tmp_path / "ckpt"), _config(on_corrupt="fail"))
  ckpt.save(1, _tree(float("nan")), force=True)
  ckpt.close()
  ckpt = checkpointing.Checkpoints(str(tmp_path / "ckpt"), _config(on_corrupt="fail"))
  with pytest.raises(checkpointing.CorruptCheckpointError, match="non-finite values.*w"):
    ckpt.restore(_abstract(_tree(0.0)))
  ckpt.close()


def test_truncated_iterator_state_fails_naming_the_file(tmp_path):
  directory = tmp_path / "ckpt"
  _two_checkpoints(directory)
  state_file = next((directory / "2" / "data").glob("process_*.json"))
  state_file.write_text(state_file.read_text()[:7])
  ckpt = checkpointing.Checkpoints(str(directory), _config())
  with pytest.raises(checkpointing.CorruptCheckpointError,
                     match=f"iterator state {state_file} is not valid JSON"):
    ckpt.restore(_abstract(_tree(0.0)), _Iterator(), step=2)
  ckpt.close()


def test_exported_params_are_never_non_finite(tmp_path):
  import ml_collections

  params = {"layer": {"kernel": np.ones((2, 2), np.float32),
                      "bias": np.array([0.0, np.inf], np.float32)}}
  with pytest.raises(ValueError, match="non-finite values in 1 parameters, e.g. layer/bias"):
    param_store.save_params(tmp_path / "out", params, ml_collections.ConfigDict())
  assert not (tmp_path / "out" / param_store.PARAMS_DIR).exists()


def test_nonfinite_check_covers_host_bfloat16_slices_and_device_arrays():
  """Host arrays are checked slice by slice (no full float32 copy of a 7B leaf): a NaN
  in the last slice of a bfloat16 leaf is found; device arrays go through jit."""
  import jax.numpy as jnp
  import ml_dtypes

  host = np.zeros(10, ml_dtypes.bfloat16)
  host[-1] = np.nan
  assert param_store.count_nonfinite(host, chunk=3) == 1
  tree = {"a": {"host": host, "ok": np.ones(3, ml_dtypes.bfloat16)},
          "dev": jnp.array([1.0, jnp.inf]), "ids": np.arange(3)}
  assert param_store.nonfinite_leaves(tree) == ["a/host", "dev"]


# --------------------------------------------------------------------------------------
# 8, 9. Relative workdirs; a failed save stops with one line and keeps the last good one.
# --------------------------------------------------------------------------------------


def test_relative_checkpoint_directory_is_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  ckpt = checkpointing.Checkpoints("run/checkpoints", _config())
  assert ckpt.directory.is_absolute()
  ckpt.save(1, _tree(1.0), force=True)
  ckpt.close()
  assert (tmp_path / "run" / "checkpoints" / "1").is_dir()
  assert param_store.resolve("gs://bucket/run").as_posix() == "gs://bucket/run"


def test_a_failed_save_raises_one_line_and_keeps_the_previous_checkpoint(tmp_path):
  """A full disk, imitated with RLIMIT_FSIZE (writes past the limit fail with EFBIG)."""
  directory = tmp_path / "ckpt"
  ckpt = checkpointing.Checkpoints(str(directory), _config(keep=1))
  ckpt.save(1, _tree(1.0), _Iterator(1))
  ckpt.wait()
  # Random values: orbax compresses, a constant array would fit under the limit.
  big = {"w": jax.random.normal(jax.random.key(0), (512, 1024)),
         "b": jnp.arange(8, dtype=jnp.int32)}
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
  try:
    with pytest.raises(checkpointing.CheckpointSaveError) as e:
      ckpt.save(2, big, _Iterator(2))
      ckpt.wait()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)
  line = str(e.value)
  assert "\n" not in line and line.startswith(f"checkpoint of step 2 could not be written to "
                                              f"{directory}")
  assert "the checkpoint of step 1 is intact" in line, line
  with pytest.raises(checkpointing.CheckpointSaveError):  # the loop's per-step check
    ckpt.check()
  ckpt.close()  # already reported: not raised again
  fresh = checkpointing.Checkpoints(str(directory), _config(keep=1))
  it = _Iterator()
  state, step = fresh.restore(_abstract(_tree(0.0)), it)
  fresh.close()
  assert step == 1 and it.position == 1 and float(state["w"][0, 0]) == 1.0


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
  path = tmp_path / metrics_lib.METRICS_FILE
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
  assert [r["step"] for r in metrics_lib.read_metrics(tmp_path)] == [1, 2]
  writer = metrics_lib.MetricWriter(tmp_path, resume_step=2)
  writer.write(3, {"loss": 1.0})
  writer.close()
  assert [r["step"] for r in metrics_lib.read_metrics(tmp_path)] == [1, 2, 3]
  path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')  # damage elsewhere is named
  with pytest.raises(ValueError, match=f"{path} line 2 is not JSON"):
    metrics_lib.read_metrics(tmp_path)


# --------------------------------------------------------------------------------------
# 4, 11, 12. Conversion and evaluation inputs.
# --------------------------------------------------------------------------------------


def test_import_checks_dtype_and_finiteness_naming_the_key():
  from mplug2_jax.convert.__main__ import check_imported

  want = {"a/kernel": jax.ShapeDtypeStruct((2,), jnp.float32)}
  with pytest.raises(ValueError, match="tensor a/kernel: dtype int32"):
    check_imported({"a/kernel": np.array([1, 2], np.int32)}, want)
  with pytest.raises(ValueError, match="tensor a/kernel: dtype float16.*--allow_cast"):
    check_imported({"a/kernel": np.array([1, 2], np.float16)}, want)
  out = check_imported({"a/kernel": np.array([1, 2], np.float16)}, want, allow_cast=True)
  assert out["a/kernel"].dtype == np.float32
  with pytest.raises(ValueError, match="tensor a/kernel: 1 non-finite"):
    check_imported({"a/kernel": np.array([1, np.nan], np.float32)}, want)


def test_classification_is_not_exported_and_says_why():
  from mplug2_jax.convert import mplug2 as conversion
  from mplug2_jax.models.mplug2 import config as mplug2_config

  m = mplug2_config.model_config("tiny", "classification")
  with pytest.raises(conversion.ConversionError, match="no official PyTorch model.*caption"):
    conversion.export_official({}, m, None)


def test_parameters_of_another_size_are_named():
  expected = {"a": jax.ShapeDtypeStruct((4, 8), jnp.float32),
              "b": jax.ShapeDtypeStruct((8,), jnp.float32)}
  param_store.check_shapes({"a": np.zeros((4, 8)), "b": np.zeros(8)}, expected, "ck")
  with pytest.raises(ValueError, match=r"ck: .*a: \(4, 16\) vs the model's \(4, 8\).*missing b"):
    param_store.check_shapes({"a": np.zeros((4, 16))}, expected, "ck")


# --------------------------------------------------------------------------------------
# 13. Config values fail before compute, naming the key.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("updates,match", [
    ({"checkpoint.every_steps": 0}, "checkpoint.every_steps=0"),
    ({"optimizer.lr": -1.0}, "optimizer.lr=-1.0"),
    ({"model.vision.temporal_downsampling": True, "model.num_frames": 3},
     "model.num_frames=3: temporal downsampling"),
    ({"checkpoint.on_corrupt": "ignore"}, "checkpoint.on_corrupt='ignore'"),
])
def test_bad_config_values_name_the_key(updates, match):
  config = experiment.base_config("tiny", "videoqa")
  config.total_steps = 10
  experiment.validate(config, 1)  # valid as it is
  for key, value in updates.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  with pytest.raises(ConfigError, match=match):
    experiment.validate(config, 1)



def test_closed_event_loop_reports_are_dropped_and_nothing_else(tmp_path):
  """After a failed write TensorStore threads call `call_soon_threadsafe` on orbax's closed
  event loop; those reports are dropped, any other exception of a thread still prints.
  (In a subprocess: pytest replaces the thread hook around each test.)"""
  import subprocess
  import sys

  code = f"""
import asyncio, threading
from mplug2_jax.train import checkpointing
checkpointing.Checkpoints({str(tmp_path / "ckpt")!r})
loop = asyncio.new_event_loop()
loop.close()
def closed_loop():
  loop.call_soon_threadsafe(lambda: None)  # RuntimeError: Event loop is closed
def other():
  raise ValueError("a real failure")
for target in (closed_loop, other):
  thread = threading.Thread(target=target)
  thread.start()
  thread.join()
"""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=300, cwd=repo, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "Event loop is closed" not in proc.stderr, proc.stderr[-2000:]
  assert "ValueError: a real failure" in proc.stderr, proc.stderr[-2000:]
