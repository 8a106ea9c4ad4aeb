"""Synthetic batches of a task's real shapes and the machine's matmul ceiling."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mplug2_jax.models import mplug2


def batch_spec(config: ml_collections.ConfigDict, batch_size: int, text_length: int,
               answer_length: int = 0) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of every key the task's objective reads (see data/pipeline.py),
  without allocating anything. Answers are `answer_length` tokens (0 = `text_length`)."""
  m = config.model
  spec = dict(jax.eval_shape(lambda: mplug2.dummy_batch(m, batch_size, text_length)))
  if answer_length and "answer_ids" in spec:
    for key in ("answer_ids", "answer_mask"):
      spec[key] = jax.ShapeDtypeStruct((spec[key].shape[0], answer_length), spec[key].dtype)
  i32, f32 = jnp.int32, jnp.float32
  if "caption_ids" in spec:
    spec["caption_labels"] = spec["caption_ids"]
  if "answer_ids" in spec:
    spec["answer_labels"] = spec["answer_ids"]
    spec["answer_weights"] = jax.ShapeDtypeStruct(spec["answer_ids"].shape[:1], f32)
  if m.task in ("retrieval", "pretrain"):
    spec["image_ids"] = jax.ShapeDtypeStruct((batch_size,), i32)
  if m.task == "classification":
    spec["labels"] = jax.ShapeDtypeStruct((batch_size,), i32)
  return spec


def synthetic_batch(config: ml_collections.ConfigDict, batch_size: int, text_length: int,
                    seed: int = 0, answer_length: int = 0) -> dict[str, jax.Array]:
  """Random inputs of `batch_spec`: noise video, random word ids after [CLS], labels as
  the official ones (caption prompt masked), unit answer weights, distinct image ids."""
  m = config.model
  rng = np.random.default_rng(seed)
  out = {}
  for name, s in batch_spec(config, batch_size, text_length, answer_length).items():
    if name == "video":
      value = rng.normal(size=s.shape).astype(np.float32)
    elif name.endswith("_ids") and name != "image_ids":
      value = rng.integers(104, m.text.vocab_size, s.shape).astype(np.int32)
      value[:, 0] = 101
    elif name.endswith("_mask"):
      value = np.ones(s.shape, np.int32)
    elif name == "answer_question_index":
      value = np.arange(s.shape[0], dtype=np.int32) * batch_size // s.shape[0]
    elif name == "answer_weights":
      value = np.ones(s.shape, np.float32)
    elif name == "image_ids":
      value = np.arange(batch_size, dtype=np.int32)
    elif name == "labels":
      value = rng.integers(0, m.num_classes, s.shape).astype(np.int32)
    else:
      continue
    out[name] = value
  for labels, ids in (("caption_labels", "caption_ids"), ("answer_labels", "answer_ids")):
    if ids in out:
      out[labels] = out[ids].copy()
  if "caption_labels" in out:
    out["caption_labels"][:, :3] = -100  # [CLS] + prompt pieces, as the official labels
  return {k: jnp.asarray(v) for k, v in out.items()}


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


def profile_top_ops(fn, trace_dir: str, hlo_text: str, top: int = 15
                    ) -> list[tuple[str, float, int, str, str]]:
  """Runs `fn()` once under `jax.profiler` and returns the `top` XLA:CPU operations by
  total time: (instruction, seconds, executions, result shape, JAX source op_name).

  Durations are the runtime's per-thunk trace events; executions > 1 are scanned layers
  (one event per layer). Control flow (while / conditional / call) is left out: its event
  spans the operations of its body, which are counted themselves. The HLO text of the
  compiled step names each instruction's shape and source.
  """
  import collections
  import glob
  import re

  jax.profiler.start_trace(trace_dir)
  jax.block_until_ready(fn())
  jax.profiler.stop_trace()
  path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
  total: collections.Counter = collections.Counter()
  count: collections.Counter = collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      if "PjRtCpuClient" not in line.name and "XLAEigen" not in line.name:
        continue
      for event in line.events:
        name = event.name
        if name.startswith(("ThreadpoolListener", "end:", "ThunkExecutor", "SlinkyThreadPool",
                            "while", "conditional", "call")):
          continue
        total[name] += event.duration_ns / 1e9
        count[name] += 1
  info = {}
  for text in hlo_text.splitlines():
    match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+)", text)
    if match:
      source = re.search(r'op_name="([^"]*)"', text)
      info[match.group(1)] = (match.group(2), source.group(1) if source else "")
  return [(name, seconds, count[name], *info.get(name, ("?", "")))
          for name, seconds in total.most_common(top)]


def op_kind_shares(rows) -> dict[str, float]:
  """Share of time per kind of operation (instruction name without its number)."""
  import re

  kinds: dict[str, float] = {}
  for name, seconds, *_ in rows:
    kind = re.sub(r"\.\d+$", "", name)
    kinds[kind] = kinds.get(kind, 0.0) + seconds
  total = sum(kinds.values()) or 1.0
  return {k: v / total for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
