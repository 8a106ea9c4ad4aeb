r"""Training entry point.

  python -m mplug2_jax.main --config configs/X.py[:arg] --workdir DIR [--config.key=value ...]

The config is locked (a mistyped `--config.key` fails instead of adding a key) and validated
against the device count before any compute. Multi-process runs (TPU pods, SLURM, GKE, or
the explicit `--coordinator_address/--num_processes/--process_id` flags) start through
`mplug2_jax.distributed` (its flags: --distributed, --local_device_ids, --num_hosts,
--init_timeout), which checks the global device count against `config.mesh.shape` before
any compile; every process runs this same command. The launchers in `mplug2_jax.launch`
write these commands for TPU pods, GKE/xpk, SLURM and local multi-process runs
(docs/launch.md).
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from mplug2_jax import cli, distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/demo.py:data=/tmp/demo",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and plots go here.")
_DISTRIBUTED = distributed.define_flags()
_STOP_AFTER = flags.DEFINE_integer("stop_after", 0,
                                   "stop (with a checkpoint) after this many steps of this "
                                   "invocation; 0 = run to config.total_steps")
flags.mark_flags_as_required(["config", "workdir"])


def quiet_library_logs() -> None:
  """Keeps orbax's per-save INFO chatter out of the console (warnings still show)."""
  import logging as std

  class Filter(std.Filter):
    def filter(self, record):
      return record.levelno >= std.WARNING or "orbax" not in record.pathname

  std.getLogger("absl").addFilter(Filter())
  for handler in std.getLogger().handlers:
    handler.addFilter(Filter())


def main(argv):
  del argv
  from mplug2_jax import hostenv
  hostenv.reexec_with_malloc_hugepages()  # host-side step temporaries (see hostenv.py)
  quiet_library_logs()
  plan = distributed.initialize(_DISTRIBUTED.plan())

  import jax
  from mplug2_jax import experiment
  from mplug2_jax.evaluate import in_loop
  from mplug2_jax.train import loop

  config = _CONFIG.value
  distributed.preflight(config.mesh, plan)
  experiment.validate(config, jax.device_count())
  experiment.check_input(config)
  if jax.process_index() == 0:
    logging.info("config:\n%s", config)
  from mplug2_jax.train import checkpointing, step as step_lib
  try:
    summary = loop.train(config, _WORKDIR.value, evaluator=in_loop.make_evaluator(config),
                         stop_after=_STOP_AFTER.value or None)
  except (checkpointing.CheckpointSaveError, checkpointing.CorruptCheckpointError,
          step_lib.NonFiniteError) as e:
    # One line, not tracebacks: the step, the path and the cause are in `e`. The exit skips
    # the interpreter's teardown, where orbax's writer threads (still finishing the failed
    # save's futures) would print tracebacks about closed event loops.
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)
  if jax.process_index() == 0:
    print(f"{summary['status']} at step {summary['step']}: workdir {_WORKDIR.value}",
          flush=True)


if __name__ == "__main__":
  cli.run(main)
