"""CLI: build an ArrayRecord dataset from a raw layout (see `sources.py` for the layouts).

  python -m mplug2_jax.data.build --kind video_caption --videos DIR \\
      --annotations train.jsonl --eval_annotations test.jsonl --out DIR

Splits: `--annotations` (repeatable; files concatenated) -> `--split` (default train);
`--eval_annotations` -> `--eval_split` (default test). Bad inputs (missing, empty,
unreadable media; empty or non-UTF-8 text) are skipped and counted; above
`--max_bad_fraction` the build fails and nothing complete is written.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from mplug2_jax.data import records, sources
from mplug2_jax.data.bad_data import BadDataCounter


def build(kind: str, out: str, splits: dict[str, Sequence[str]], root: str = "",
          max_bad_fraction: float = 0.01, verify: bool = True, vg_root: str | None = None,
          log=print) -> str:
  """Builds `splits` (name -> annotation files); returns the dataset directory."""
  counters = {name: BadDataCounter(max_bad_fraction, min_samples=0, what=f"{name} records")
              for name in splits}
  kwargs = {"vg_root": vg_root} if kind == "vqa" else {}

  def maker(name, paths):
    return lambda: sources.records(kind, paths, root, counters[name], verify, **kwargs)

  metadata = {"kind": kind, "annotations": {k: list(v) for k, v in splits.items()}}
  if kind == "kinetics":
    # One class list for every split, so that a split missing a class keeps the indices.
    anns = sources.read_all([p for v in splits.values() for p in v])
    metadata["classes"] = sorted({a["label"] for a in anns})
    kwargs["classes"] = metadata["classes"]
  start = time.time()
  path = records.write(out, kind, {n: maker(n, p) for n, p in splits.items()}, metadata)
  for name, c in counters.items():
    log(f"{name}: {c.good} records written, {c.bad} skipped {dict(c.counts)}"
        + "".join(f"\n  {r}: {why} {d}" for r, why, d in c.first))
  log(f"wrote {path} in {time.time() - start:.1f}s")
  return path


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--kind", required=True, choices=sorted(records.KINDS))
  p.add_argument("--videos", "--images", "--media", dest="root", default="",
                 help="folder the annotation paths are relative to")
  p.add_argument("--vg_images", default=None, help="vqa: root of the Visual Genome images")
  p.add_argument("--annotations", action="append", required=True)
  p.add_argument("--split", default="train")
  p.add_argument("--eval_annotations", action="append", default=[])
  p.add_argument("--eval_split", default="test")
  p.add_argument("--out", required=True)
  p.add_argument("--max_bad_fraction", type=float, default=0.01)
  p.add_argument("--no_verify", action="store_true", help="skip opening each media file")
  args = p.parse_args(argv)
  splits = {args.split: args.annotations}
  if args.eval_annotations:
    splits[args.eval_split] = args.eval_annotations
  build(args.kind, args.out, splits, args.root, args.max_bad_fraction, not args.no_verify,
        args.vg_images)


if __name__ == "__main__":
  main(sys.argv[1:])
