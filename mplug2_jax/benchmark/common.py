"""Synthetic batches of a task's real shapes and the machine's matmul ceiling."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mplug2_jax.models import mplug2


def synthetic_batch(config: ml_collections.ConfigDict, batch_size: int, text_length: int,
                    seed: int = 0) -> dict[str, jax.Array]:
  """Random inputs with every key the task's objective reads (see data/pipeline.py)."""
  m = config.model
  rng = np.random.default_rng(seed)
  batch = {k: np.asarray(v) for k, v in mplug2.dummy_batch(m, batch_size, text_length).items()}
  batch["video"] = rng.normal(size=batch["video"].shape).astype(np.float32)
  for name in list(batch):
    if name.endswith("_ids"):
      ids = rng.integers(104, m.text.vocab_size, batch[name].shape).astype(np.int32)
      ids[:, 0] = 101
      batch[name] = ids
  if "caption_ids" in batch:
    labels = batch["caption_ids"].copy()
    labels[:, :3] = -100  # [CLS] + prompt pieces, as the official caption labels
    batch["caption_labels"] = labels
  if "answer_ids" in batch:
    batch["answer_labels"] = batch["answer_ids"].copy()
    batch["answer_weights"] = np.ones(batch["answer_ids"].shape[0], np.float32)
  if m.task in ("retrieval", "pretrain"):
    batch["image_ids"] = np.arange(batch_size, dtype=np.int32)
  if m.task == "classification":
    batch["labels"] = rng.integers(0, m.num_classes, batch_size).astype(np.int32)
  return {k: jnp.asarray(v) for k, v in batch.items()}


def matmul_ceiling_gflops(dtype=jnp.float32, n: int = 2048, repeats: int = 5) -> float:
  """Best-of-`repeats` throughput of one n^3 matmul in `dtype` on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    dot(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best / 1e9


def timed(fn, *args, steps: int, warmup: int = 1):
  """Median seconds per call of `fn(*args)` (outputs blocked on) after `warmup` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))
