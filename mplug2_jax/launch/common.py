"""Shared by the launchers: the `-- COMMAND` split, running or printing shell steps."""

from __future__ import annotations

import shlex
import subprocess
import sys
from typing import Sequence


class UsageError(ValueError):
  """A bad launcher argument; the launchers print it as one line and exit 2."""


def split_command(argv: Sequence[str] | None) -> tuple[list[str], list[str]]:
  """(launcher flags, command after `--`)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" not in argv:
    return argv, []
  cut = argv.index("--")
  return argv[:cut], argv[cut + 1:]


def quote(command: Sequence[str]) -> str:
  return shlex.join(list(command))


def run_steps(steps: Sequence[str], dry_run: bool, check: bool = True) -> int:
  """Prints each shell step; runs it unless `dry_run` (stops at the first failure)."""
  for step in steps:
    print(step, flush=True)
    if not dry_run:
      rc = subprocess.run(["bash", "-c", step]).returncode
      if rc and check:
        return rc
  return 0
