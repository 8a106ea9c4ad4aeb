"""Bookkeeping for bad samples, shared by the builders and the input pipeline.

A bad sample (missing/empty/corrupt/truncated media, no decodable frames, empty or
non-UTF-8 text; reasons in `media.REASONS`) is skipped and counted per reason. When the bad
share of all samples seen exceeds `max_fraction` (after `min_samples`, so that one early
failure does not stop a run), `TooManyBadSamples` names the first offending records.
"""

from __future__ import annotations

import collections
from typing import Any

from mplug2_jax.data.media import REASONS


class TooManyBadSamples(RuntimeError):
  pass


class BadDataCounter:
  """Per-reason counts and the first `keep` offenders; JSON-serialisable via `state`."""

  def __init__(self, max_fraction: float, min_samples: int = 100, keep: int = 10,
               what: str = "samples"):
    self.max_fraction, self.min_samples, self.keep, self.what = max_fraction, min_samples, keep, what
    self.counts: collections.Counter = collections.Counter()
    self.good = 0
    self.first: list[tuple[str, str, str]] = []  # (record, reason, detail)

  @property
  def bad(self) -> int:
    return sum(self.counts.values())

  def add_good(self, n: int = 1) -> None:
    self.good += n

  def add_bad(self, record: str, reason: str, detail: str = "") -> None:
    assert reason in REASONS, reason
    self.counts[reason] += 1
    if len(self.first) < self.keep:
      self.first.append((record, reason, detail))

  def check(self, final: bool = False) -> None:
    """Raises TooManyBadSamples if the bad share is over the limit."""
    total = self.good + self.bad
    if not total or (total < self.min_samples and not final):
      return
    if self.bad / total > self.max_fraction:
      listing = "\n".join(f"  {rec}: {reason} {detail}".rstrip() for rec, reason, detail in self.first)
      raise TooManyBadSamples(
          f"{self.bad} of {total} {self.what} are bad ({self.bad / total:.1%} > "
          f"max_bad_fraction {self.max_fraction:.1%}); by reason {dict(self.counts)}; "
          f"first offending records:\n{listing}")

  def metrics(self, prefix: str = "data/bad/") -> dict[str, int]:
    """Counts for logging: one entry per reason plus the total."""
    out = {prefix + r: int(self.counts.get(r, 0)) for r in REASONS}
    out[prefix + "total"] = self.bad
    return out

  def state(self) -> dict[str, Any]:
    return {"counts": dict(self.counts), "good": self.good, "first": [list(x) for x in self.first]}

  def set_state(self, state: dict[str, Any]) -> None:
    self.counts = collections.Counter(state["counts"])
    self.good = int(state["good"])
    self.first = [tuple(x) for x in state["first"]]
