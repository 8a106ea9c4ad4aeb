"""CLI: build an ArrayRecord dataset from a raw layout (see `sources.py` for the layouts).

  python -m mplug2_jax.data.build --kind video_caption --videos DIR \\
      --annotations train.jsonl --eval_annotations test.jsonl --out DIR

Splits: `--annotations` (repeatable; files concatenated) -> `--split` (default train);
`--eval_annotations` -> `--eval_split` (default test). Bad inputs (missing, empty,
unreadable media; empty or non-UTF-8 text; malformed annotation records; media paths
outside the media folder or not regular files; sampling windows outside the clip) are
skipped and counted, each offender named with its file and line; above
`--max_bad_fraction` the build fails and nothing complete is written.
"""

from __future__ import annotations

import sys
import time
from typing import Sequence

from absl import flags

from mplug2_jax import cli
from mplug2_jax.data import records, sources
from mplug2_jax.data.bad_data import BadDataCounter, TooManyBadSamples


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
    anns = sources.read_all([p for v in splits.values() for p in v], BadDataCounter(1.0))
    metadata["classes"] = sources.kinetics_classes(anns)
    kwargs["classes"] = metadata["classes"]
  start = time.time()
  path = records.write(out, kind, {n: maker(n, p) for n, p in splits.items()}, metadata)
  for name, c in counters.items():
    log(f"{name}: {c.good} records written, {c.bad} skipped {dict(c.counts)}"
        + "".join(f"\n  {r}: {why} {d}" for r, why, d in c.first))
  log(f"wrote {path} in {time.time() - start:.1f}s")
  return path


def flag_values() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_enum("kind", None, sorted(records.KINDS), "Dataset layout.", flag_values=fv)
  flags.DEFINE_string("videos", "", "Folder the annotation media paths are relative to.",
                      flag_values=fv)
  flags.DEFINE_alias("images", "videos", flag_values=fv)
  flags.DEFINE_alias("media", "videos", flag_values=fv)
  flags.DEFINE_string("vg_images", None, "vqa: root of the Visual Genome images.",
                      flag_values=fv)
  flags.DEFINE_multi_string("annotations", [], "Annotation file(s) of --split.", flag_values=fv)
  flags.DEFINE_string("split", "train", "Split name of --annotations.", flag_values=fv)
  flags.DEFINE_multi_string("eval_annotations", [], "Annotation file(s) of --eval_split.",
                            flag_values=fv)
  flags.DEFINE_string("eval_split", "test", "Split name of --eval_annotations.", flag_values=fv)
  flags.DEFINE_string("out", None, "Output dataset directory.", flag_values=fv)
  flags.DEFINE_float("max_bad_fraction", 0.01, "Fail when more records than this are bad.",
                     flag_values=fv)
  flags.DEFINE_bool("verify", True, "Open each media file (--noverify skips it).",
                    flag_values=fv)
  for name in ("kind", "out"):
    flags.mark_flag_as_required(name, flag_values=fv)
  return fv


def main(argv: Sequence[str] | None = None) -> None:
  fv = flag_values()
  cli.parse(fv, [("--noverify" if a == "--no_verify" else a) for a in (argv or sys.argv[1:])],
            __doc__)
  if not fv.annotations:
    print("error: --annotations is required", file=sys.stderr)
    sys.exit(2)
  splits = {fv.split: fv.annotations}
  if fv.eval_annotations:
    splits[fv.eval_split] = fv.eval_annotations
  try:
    build(fv.kind, fv.out, splits, fv.videos, fv.max_bad_fraction, fv.verify, fv.vg_images)
  except (ValueError, OSError, TooManyBadSamples) as e:  # a file or the data named in `e`
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
