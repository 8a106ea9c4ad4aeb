r"""Number-for-number parity with the official PyTorch models on golden case folders.

    python -m mplug2_jax.convert.parity CASE_DIR [CASE_DIR ...]

Each case folder holds `config.json` (official config names), `model.safetensors`
(official keys), `inputs.npz` and `outputs.npz`. The family whose conversion package
recognises the config builds the model from it alone, imports the weights with its strict
converter and computes the arrays in float32 at full matmul precision; every array of
`outputs.npz` is compared: floats within the family's tolerance (1e-4 absolute), integer
arrays (ids, lengths, ranks, masks) exactly. Prints one line per array and ends with
`parity: N/M arrays within ..., max abs diff X`; exit status 1 on any failure.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import sys

import numpy as np
from absl import app

from mplug2_jax.models import registry

TOLERANCE = 1e-4
# Diagnostics of the reference generator, not outputs of the model.
DIAGNOSTIC_SUFFIX = "_min_topk_gap"


def parity_module(case_dir: pathlib.Path):
  """The parity module of the family that recognises the case's config.json."""
  path = case_dir / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing: not a golden case folder")
  case = json.loads(path.read_text())
  for name in registry.FAMILIES:
    module = importlib.import_module(registry.get(name).CONVERSION + ".parity")
    if module.recognises(case):
      return module
  raise ValueError(f"{path}: no model family recognises this config")


def compare(expected: dict[str, np.ndarray], ours: dict[str, np.ndarray],
            tolerance: float = TOLERANCE, where: dict[str, np.ndarray] | None = None):
  """Rows (name, ok, max abs diff, note). `where[name]` restricts an array's comparison
  to its True entries (broadcast from the leading dims)."""
  rows = []
  for name, ref in expected.items():
    if name.endswith(DIAGNOSTIC_SUFFIX):
      continue
    if name not in ours:
      rows.append((name, False, float("inf"), "not computed"))
      continue
    got = np.asarray(ours[name])
    if got.shape != ref.shape:
      rows.append((name, False, float("inf"), f"shape {got.shape} != {ref.shape}"))
      continue
    keep = None if where is None or name not in where else np.asarray(where[name], bool)
    if keep is not None:
      keep = np.broadcast_to(keep.reshape(keep.shape + (1,) * (ref.ndim - keep.ndim)), ref.shape)
      got, ref = got[keep], ref[keep]
    if np.issubdtype(ref.dtype, np.integer):
      diff = float(np.max(np.abs(got.astype(np.int64) - ref))) if ref.size else 0.0
      rows.append((name, diff == 0, diff, "exact"))
    else:
      diff = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
      rows.append((name, diff <= tolerance, diff, ""))
  return rows


def check_cases(case_dirs) -> tuple[int, int, float]:
  """Runs and prints every case; returns (passed, total, worst difference)."""
  import jax

  jax.config.update("jax_default_matmul_precision", "highest")
  total = passed = 0
  worst = 0.0
  for case_dir in map(pathlib.Path, case_dirs):
    module = parity_module(case_dir)
    expected, ours, where = module.run(case_dir)
    rows = compare(expected, ours, getattr(module, "TOLERANCE", TOLERANCE), where)
    print(f"== {case_dir}")
    for name, ok, diff, note in rows:
      print(f"  {'ok  ' if ok else 'FAIL'} {name:36s} max abs diff {diff:.3e} {note}")
      total += 1
      passed += ok
      worst = max(worst, diff)
  return passed, total, worst


def main(argv: list[str]) -> int:
  cases = argv[1:]
  if not cases:
    raise app.UsageError("give one or more golden case folders")
  passed, total, worst = check_cases(cases)
  print(f"parity: {passed}/{total} arrays within {TOLERANCE:g}, max abs diff {worst:.3e}")
  return 0 if passed == total else 1


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
