"""Benchmarks: `python -m mplug2_jax.benchmark` (train step, encoder, generation on this
machine) and `python -m mplug2_jax.benchmark.plan` (AOT compilation for large meshes)."""
