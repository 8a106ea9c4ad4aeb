"""Host process settings that must be in place before the process starts.

XLA:CPU allocates the temporaries of every executed step afresh and glibc serves such
large blocks with `mmap`, so every step first-touches them again 4 KiB at a time (page
faults and kernel time per step: docs/performance.md). With the glibc tunable
`glibc.malloc.hugetlb=1` malloc marks its mappings for transparent huge pages (the
kernel's `madvise` mode), so a step touches 2 MiB pages instead.

A glibc tunable is read once at process start, so `reexec_with_malloc_hugepages()` restarts
the current command with it set (the entry points call it before any work). Set
`MPLUG2_MALLOC_HUGEPAGES=0` to keep the environment as it is.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_available() -> bool:
  try:
    with open(_THP) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def reexec_with_malloc_hugepages() -> None:
  """Re-executes this process with `GLIBC_TUNABLES` including TUNABLE (Linux, glibc, THP
  not disabled); a no-op when it is already set or the opt-out variable is 0."""
  if os.environ.get("MPLUG2_MALLOC_HUGEPAGES", "1") == "0":
    return
  current = os.environ.get("GLIBC_TUNABLES", "")
  if TUNABLE in current.split(":") or not sys.platform.startswith("linux"):
    return
  import platform

  if platform.libc_ver()[0] != "glibc" or not _thp_available():
    return
  env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, (current, TUNABLE))))
  sys.stdout.flush()
  sys.stderr.flush()
  # sys.orig_argv is the command as typed (`python -m package ...`), unlike sys.argv.
  os.execve(sys.executable, list(sys.orig_argv), env)
