"""Times one Dense layer's three products in each operand order XLA:CPU can be given.

    python -m mplug2_jax.benchmark.matmul_forms [--tokens 3152 --width 768 --hidden 3072]

A linear layer y = x·W (x: tokens × width, W: width × hidden) needs, per train step, the
forward x·W, the input gradient dy·Wᵀ and the weight gradient xᵀ·dy. Each is timed alone
(best of interleaved repeats, so machine noise hits every form alike), plus dy·W' with W'
an already transposed copy: if a transposed operand were slow, dy·Wᵀ would lag dy·W'.
The defaults are the ViT-B MLP of the base benchmark (batch 4 × 4 frames × 197 tokens).
docs/performance.md quotes the result.
"""

from __future__ import annotations

import time

from absl import app, flags

_TOKENS = flags.DEFINE_integer("tokens", 3152, "Rows of x (batch × sequence).")
_WIDTH = flags.DEFINE_integer("width", 768, "Input features.")
_HIDDEN = flags.DEFINE_integer("hidden", 3072, "Output features.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved repeats per form.")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp

  m, k, n = _TOKENS.value, _WIDTH.value, _HIDDEN.value
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (m, k))
  w = jax.random.normal(keys[1], (k, n))
  dy = jax.random.normal(keys[2], (m, n))
  w_transposed = jnp.asarray(w.T)  # materialised: a row-major (hidden, width) array
  forms = {
      "forward x·W": (jax.jit(lambda x, w: x @ w), (x, w)),
      "input gradient dy·Wᵀ": (jax.jit(lambda dy, w: dy @ w.T), (dy, w)),
      "dy·W' (W' = Wᵀ stored)": (jax.jit(lambda dy, wt: dy @ wt), (dy, w_transposed)),
      "weight gradient xᵀ·dy": (jax.jit(lambda x, dy: x.T @ dy), (x, dy)),
  }
  for fn, args in forms.values():
    jax.block_until_ready(fn(*args))
  best = {name: float("inf") for name in forms}
  for _ in range(_REPEATS.value):
    for name, (fn, args) in forms.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      best[name] = min(best[name], time.perf_counter() - start)
  gflop = 2 * m * k * n / 1e9
  print(f"{m} x {k} x {n} fp32 on {jax.device_count()} {jax.default_backend()} device(s), "
        f"{gflop:.1f} GFLOP each, best of {_REPEATS.value}:")
  for name, seconds in best.items():
    print(f"  {name:<26} {1e3 * seconds:8.1f} ms  {gflop / seconds:7.1f} GFLOP/s")


if __name__ == "__main__":
  app.run(main)
