r"""Training entry point.

  python -m mplug2_jax.main --config configs/X.py[:arg] --workdir DIR [--config.key=value ...]

The config is locked (a mistyped `--config.key` fails instead of adding a key) and validated
against the device count before any compute. Multi-process runs (TPU pods, SLURM, or the
explicit `--coordinator_address/--num_processes/--process_id` flags) call
`jax.distributed.initialize` first (distributed.py); every process runs this same
command.
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from mplug2_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/demo.py:data=/tmp/demo",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and plots go here.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "",
                                   "host:port of process 0 (explicit multi-process start)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "processes (explicit start)")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "this process (explicit start)")
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
  from mplug2_jax import distributed
  distributed.maybe_initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

  import jax
  from mplug2_jax import experiment
  from mplug2_jax.evaluate import in_loop
  from mplug2_jax.train import loop

  config = _CONFIG.value
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
