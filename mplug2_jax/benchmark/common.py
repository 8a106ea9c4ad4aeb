"""Synthetic batches of a task's real shapes and the machine's matmul ceiling."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mplug2_jax.models import registry, schema as schema_lib


def set_text_lengths(config: ml_collections.ConfigDict, text_length: int,
                     answer_length: int = 0) -> None:
  """Sets the data lengths the batch schema reads: every text field `text_length` tokens,
  answers `answer_length` (0 = `text_length`)."""
  d = config.data
  if text_length:
    d.max_caption_len = d.max_question_len = d.max_text_len = text_length
  if answer_length or text_length:
    d.max_answer_len = answer_length or text_length


def batch_spec(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of the task's batch (the family's schema), without allocating."""
  family = registry.of(config.model)
  return schema_lib.shapes(family.batch_schema(config.model, config.data,
                                               int(config.batch_size)))


def synthetic_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, jax.Array]:
  """Random inputs of the task's batch schema, every text at its full length (as the
  official CPU baseline's inputs)."""
  family = registry.of(config.model)
  schema = family.batch_schema(config.model, config.data, int(config.batch_size))
  batch = family.synthetic_batch(config.model, schema, np.random.default_rng(seed),
                                 full_length=True)
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


def profile_top_ops(fn, trace_dir: str, hlo_text: str, top: int = 15
                    ) -> list[tuple[str, float, int, str, str]]:
  """Runs `fn()` once under `jax.profiler` and returns the `top` XLA:CPU operations by
  total time: (instruction, seconds, executions, result shape, JAX source op_name).

  Durations are the runtime's per-thunk trace events; executions > 1 are scanned layers
  (one event per layer). Only instructions of the compiled step's HLO are counted: control
  flow (while / conditional / call) is left out, its event spans the operations of its
  body, and so are runtime events such as a collective's rendezvous wait. The HLO text
  names each instruction's shape and source.
  """
  import collections
  import glob
  import re

  jax.profiler.start_trace(trace_dir)
  jax.block_until_ready(fn())
  jax.profiler.stop_trace()
  path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
  info = {}
  for text in hlo_text.splitlines():
    match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+)", text)
    if match:
      source = re.search(r'op_name="([^"]*)"', text)
      info[match.group(1)] = (match.group(2), source.group(1) if source else "")
  total: collections.Counter = collections.Counter()
  count: collections.Counter = collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      if "PjRtCpuClient" not in line.name and "XLAEigen" not in line.name:
        continue
      for event in line.events:
        name = event.name
        # Only the compiled step's instructions: runtime events (thread pools, collective
        # rendezvous waits) and control flow (its span holds its body's operations) are not.
        if name not in info or name.startswith(("while", "conditional", "call")):
          continue
        total[name] += event.duration_ns / 1e9
        count[name] += 1
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
