"""Command-line plumbing shared by every entry point (absl flags).

  run(main)            `app.run` whose flag parsing turns a bad config (ConfigError from
                       `get_config`, an override of a key that does not exist) or a bad
                       launch (LaunchError) into one line on stderr and exit status 2,
                       instead of a traceback
  parse(flag_values, argv, doc)
                       parses a module's own `flags.FlagValues` (CLIs whose flags must not
                       collide with others in one process: the data tools), with --help
"""

from __future__ import annotations

import re
import sys
from typing import Callable, Sequence

from absl import app, flags

from mplug2_jax.config_lib import ConfigError, LaunchError


def error_line(exc: BaseException, argv: Sequence[str] = ()) -> str | None:
  """One line for a config problem anywhere in `exc`'s chain, else None."""
  seen = set()
  e: BaseException | None = exc
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, ConfigError) and getattr(e, "key", ""):
      return str(e)
    if isinstance(e, (AttributeError, KeyError)):
      text = str(e.args[0]) if e.args else str(e)
      key = re.search(r"'([^'\\]+)'", text)
      hint = re.search(r'Did you mean "([^"]+)"', text)
      if key:
        flag = next((a.split("=")[0] for a in argv if a.startswith("--config.")
                     and a.split("=")[0].endswith("." + key.group(1))), "--config." + key.group(1))
        return (f"{flag}: the config has no key {key.group(1)!r}"
                + (f" (did you mean {hint.group(1)!r}?)" if hint else ""))
    e = e.__cause__ or e.__context__
  return None


def _one_line_flags_parser(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001  (reported in one line when it is a config problem)
    line = error_line(e, argv)
    if line is None:
      raise
    print(f"error: {line}", file=sys.stderr)
    sys.exit(2)


def run(main: Callable[[list[str]], object]) -> None:
  """`app.run(main)` with one-line config errors (at flag parsing and inside `main`)."""
  def guarded(argv):
    try:
      return main(argv)
    except ConfigError as e:
      if not e.key:
        raise
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    except LaunchError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(guarded, flags_parser=_one_line_flags_parser)


def parse(flag_values: flags.FlagValues, argv: Sequence[str] | None, doc: str) -> None:
  """Parses `argv` (without the program name; None = sys.argv[1:]) into `flag_values`.
  `--help` prints `doc` and the flags and exits 0; a bad flag prints one line, exits 2."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--help" in argv or "-h" in argv:
    print(doc.strip() + "\n\nflags:\n" + flag_values.get_help())
    sys.exit(0)
  try:
    rest = flag_values(["prog", *argv])
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if len(rest) > 1:
    print(f"error: unexpected arguments {rest[1:]}", file=sys.stderr)
    sys.exit(2)
