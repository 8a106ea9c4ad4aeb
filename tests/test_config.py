"""Configs load with size args and overrides; bad values fail before compute, naming the key."""

import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from mplug2_jax import config_lib, experiment
from mplug2_jax.models import mplug2
from conftest import REPO


def load(*argv):
  values = flags.FlagValues()
  # Overrides (--config.a.b=v) are discovered from `sys_argv`, not from the parse call.
  config_flags.DEFINE_config_file("config", None, flag_values=values,
                                  sys_argv=["prog", *argv])
  values(["prog", *argv])
  return values.config


@pytest.mark.parametrize("name", ["caption", "videoqa", "retrieval", "pretrain", "classification",
                                  "grounding"])
@pytest.mark.parametrize("size", mplug2.SIZES)
def test_every_config_file_validates(name, size):
  config = load(f"--config={REPO}/configs/{name}.py:{size}")
  assert config.model.size == size
  experiment.validate(config, num_devices=1)


def test_size_arg_and_command_line_override():
  config = load(f"--config={REPO}/configs/caption.py:large", "--config.model.num_frames=8",
                "--config.mesh.shape=(2,2,2)")
  assert config.model.vision.width == 1024 and config.model.text.encoder_layers == 24
  assert config.model.text.universal_layers == 2 and config.model.text.fusion_layers == 6
  assert config.model.text.decoder_layers == 12 and config.model.vision.patch_size == 14
  assert config.model.num_frames == 8 and tuple(config.mesh.shape) == (2, 2, 2)
  base = load(f"--config={REPO}/configs/videoqa.py:base")
  assert (base.model.vision.width, base.model.vision.patch_size) == (768, 16)
  assert (base.model.text.hidden_size, base.model.text.encoder_layers) == (768, 12)


def test_unknown_config_arg_names_the_key():
  with pytest.raises(config_lib.ConfigError, match="unknown key 'frames'"):
    config_lib.parse_arg("large,frames=3", size="large")


def bad(mutate, num_devices=1):
  config = experiment.base_config("tiny", "videoqa")
  config.batch_size = 8
  config.total_steps = 10
  mutate(config)
  with pytest.raises(config_lib.ConfigError) as error:
    experiment.validate(config, num_devices)
  return str(error.value)


@pytest.mark.parametrize("mutate,key", [
    (lambda c: c.model.text.update(num_heads=5), "model.text.hidden_size"),
    (lambda c: c.model.vision.update(width=96), "model.vision.width"),
    (lambda c: c.model.update(image_size=30), "model.image_size"),
    (lambda c: c.model.vision.update(temporal_downsampling=True) or c.model.update(num_frames=3),
     "model.num_frames"),
    (lambda c: c.model.text.update(universal_layers=5), "model.text.universal_layers"),
    (lambda c: c.model.update(task="segmentation"), "model.task"),
    (lambda c: c.model.update(attention="flash3"), "model.attention"),
    (lambda c: c.model.update(remat_policy="sometimes"), "model.remat_policy"),
    (lambda c: c.model.update(dtype="float8"), "model.dtype"),
    (lambda c: c.model.text.update(dropout=1.5), "model.text.dropout"),
    (lambda c: c.update(sharding_rules=c.sharding_rules + (("widths", "fsdp"),)),
     f"sharding_rules[{len(config_lib.DEFAULT_RULES)}]"),
    (lambda c: c.update(sharding_rules=(("embed", "model"),) + c.sharding_rules[1:]),
     "sharding_rules[0]"),
    (lambda c: c.update(sharding_rules=c.sharding_rules[:-1]), "sharding_rules"),
    (lambda c: c.model.update(name="mplug3"), "model.name"),
    (lambda c: c.checkpoint.update(every_steps=0), "checkpoint.every_steps"),
    (lambda c: c.optimizer.update(lr=-1.0), "optimizer.lr"),
    (lambda c: c.optimizer.update(accum_steps=3), "optimizer.accum_steps"),
    (lambda c: c.update(total_steps=0), "total_steps"),
])
def test_bad_model_values_name_their_key(mutate, key):
  message = bad(mutate)
  assert message.startswith(f"config.{key}="), message


def test_mesh_must_multiply_to_device_count():
  message = bad(lambda c: c.mesh.update(shape=(2, 2, 1)), num_devices=8)
  assert message.startswith("config.mesh.shape=") and "multiplies to 4" in message
  message = bad(lambda c: c.mesh.update(shape=(3, -1, 1)), num_devices=8)
  assert message.startswith("config.mesh.shape=")
  assert config_lib.mesh_shape(experiment.base_config(), 8) == (1, 8, 1)


def test_batch_must_divide_over_data_axes():
  message = bad(lambda c: c.update(batch_size=6), num_devices=8)
  assert message.startswith("config.batch_size=6")


def test_official_finetuning_hyperparameters():
  """Spec section 10: AdamW 2e-5 / 2e-6, wd 0.02, 200 warm-up iterations from 1e-6,
  min_lr 1e-6, 32 videos per iteration, caption accumulates 2 iterations."""
  for name, batch, accum, warmup in (("caption", 64, 2, 100), ("videoqa", 32, 1, 200)):
    c = load(f"--config={REPO}/configs/{name}.py:large")
    o = c.optimizer
    assert (o.lr, tuple(map(tuple, o.lr_mults)), o.weight_decay) == (2e-5, (("^vision/", 0.1),), 0.02)
    assert (o.schedule, o.warmup_lr, o.min_lr, o.grad_clip_norm) == ("cosine_step", 1e-6, 1e-6, 0.0)
    assert (c.batch_size, o.accum_steps, o.warmup_steps) == (batch, accum, warmup)
    assert (c.model.image_size, c.model.num_frames) == (224, 16)
    assert c.total_steps > 0 and c.log_every_steps > 0 and "init_checkpoint" in c
  assert load(f"--config={REPO}/configs/caption.py:large").data.max_caption_len == 20
  assert load(f"--config={REPO}/configs/videoqa.py:large").data.max_question_len == 50
  large = load(f"--config={REPO}/configs/pretrain.py:large")
  assert (large.optimizer.lr, large.optimizer.min_lr, large.batch_size) == (5e-5, 2e-6, 1024)
  assert large.objective.queue_size % large.batch_size == 0
  base = load(f"--config={REPO}/configs/pretrain.py:base")
  assert (base.optimizer.lr, base.model.image_size, base.batch_size) == (1e-4, 256, 2048)


def test_demo_config_reads_the_dataset_dir():
  c = load(f"--config={REPO}/configs/demo.py:data=/some/demo")
  assert c.data.mixture[0][0] == "/some/demo/video_retrieval"
  assert c.model.task == "pretrain" and c.objective.queue_size % c.batch_size == 0
  experiment.validate(c, num_devices=1)


def one_line(*argv):
  """The one line `cli.run` prints for loading `argv` (or None when it loads)."""
  from mplug2_jax import cli

  try:
    config = load(*argv)
    experiment.validate(config, num_devices=1)
    experiment.check_input(config)
  except Exception as e:  # noqa: BLE001
    return cli.error_line(e, argv)
  return None


@pytest.mark.parametrize("argv,line", [
    ((f"--config={REPO}/configs/caption.py:huge",),
     "config.model.size='huge': must be one of ('tiny', 'base', 'large')"),
    ((f"--config={REPO}/configs/caption.py:tiny,synthetic=1", "--config.batch_sizee=4"),
     "--config.batch_sizee: the config has no key 'batch_sizee' (did you mean 'batch_size'?)"),
    ((f"--config={REPO}/configs/caption.py:tiny",),
     "config.data.mixture=(): no training data"),
    ((f"--config={REPO}/configs/caption.py:tiny,epoch=3",),
     "config.arg='tiny,epoch=3': unknown key 'epoch' (did you mean 'epochs'?)"),
    ((f"--config={REPO}/configs/caption.py:tiny,synthetic=1",
      "--config.model.text.num_heads=5"),
     "config.model.text.hidden_size=32: not divisible by model.text.num_heads=5"),
])
def test_config_errors_are_one_line_naming_the_key(argv, line):
  """A bad size, an override typo, a missing dataset, a bad argument, a bad value: the
  one line the entry points print (cli.run) names the key."""
  got = one_line(*argv)
  assert got is not None and got.startswith(line), got


def test_entry_point_prints_one_line_and_exits_before_compute(tmp_path):
  """Through `python -m mplug2_jax.main`: status 2, one `error:` line, no traceback, nothing
  compiled or written."""
  result = subprocess.run(
      [sys.executable, "-m", "mplug2_jax.main", f"--workdir={tmp_path / 'run'}",
       f"--config={REPO}/configs/caption.py:tiny,synthetic=1", "--config.batch_sizee=4"],
      capture_output=True, text=True, timeout=300,
      env={**os.environ, "MPLUG2_MALLOC_HUGEPAGES": "0", "XLA_FLAGS": ""})
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert errors == ["error: --config.batch_sizee: the config has no key 'batch_sizee' "
                    "(did you mean 'batch_size'?)"], result.stderr[-2000:]
  assert "Traceback" not in result.stderr and "compiled" not in result.stderr
  assert not (tmp_path / "run").exists()


def test_synthetic_data_only_when_asked_for():
  c = load(f"--config={REPO}/configs/videoqa.py:tiny")
  assert not c.synthetic_data
  with pytest.raises(config_lib.ConfigError, match="data.mixture"):
    experiment.check_input(c)
  experiment.check_input(load(f"--config={REPO}/configs/videoqa.py:tiny,synthetic=1"))


def test_every_training_config_defaults_to_the_shipped_vocabulary():
  from mplug2_jax.data import pipeline

  for name in ("caption", "videoqa", "retrieval", "pretrain", "grounding", "demo"):
    c = load(f"--config={REPO}/configs/{name}.py:" + ("tiny" if name != "demo" else ""))
    assert c.data.vocab_file == "bert-base-uncased"
  tok = pipeline.make_tokenizer(c.data)
  assert tok.encode("a man is singing")[:1] == [101]
