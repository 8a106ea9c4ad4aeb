"""Launchers: the commands that start `mplug2_jax.main` / `mplug2_jax.evaluate` on every
process of a target (local CPU processes, Cloud TPU VM slices, GKE via xpk, SLURM). Each
has `--dry_run`, which prints the exact commands or manifests and starts nothing; every
started process goes through `mplug2_jax.distributed` (docs/launch.md)."""
