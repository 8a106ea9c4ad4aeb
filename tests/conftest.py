"""Test set-up: 8 fake CPU devices (for the sharding tests) before jax is imported."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests only: the counter-based "rbg" PRNG compiles parameter init much faster than
# threefry on CPU; no test depends on particular random values.
jax.config.update("jax_default_prng_impl", "rbg")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  if not SHARED.exists():
    pytest.fail(f"{SHARED} is missing: CI clones shared/ beside the repository")
  return SHARED


def dummy_batch(model_cfg, batch_size: int = 2, text_length: int = 8,
                answers_per_question: int = 1):
  """A batch of the model family's schema for `model_cfg.task`: zero pixels, every text
  field `text_length` tokens of [CLS] (101) with full masks."""
  import jax.numpy as jnp
  import ml_collections

  from mplug2_jax.models import registry, schema

  lengths = ml_collections.ConfigDict(dict(
      task="", num_frames=0, image_size=0, max_caption_len=text_length,
      max_question_len=text_length, max_answer_len=text_length,
      answers_per_question=answers_per_question, max_text_len=text_length))
  fields = registry.of(model_cfg).batch_schema(model_cfg, lengths, batch_size)
  batch = schema.zeros(fields)
  for name, field in fields.items():
    if field.kind == "ids":
      batch[name] = jnp.full(field.shape, 101, field.dtype)
  return batch
