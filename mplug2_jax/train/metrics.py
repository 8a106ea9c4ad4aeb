"""Metric writing: the progress line, `metrics.jsonl`, TensorBoard events, the loss PNG.

Process 0 writes; other processes get a disabled writer. Paths go through etils.epath, so
a `gs://` workdir works like a local one: object stores cannot append, so on a URL workdir
`metrics.jsonl` is rewritten whole at each write (it holds one line per logged step) and
the TensorBoard event file is uploaded whole at each flush (`_EpathEventFile`, registered
with tensorboardX for every URL scheme epath knows).
"""

from __future__ import annotations

import io
import json
import math

from absl import logging
from etils import epath

METRICS_FILE = "metrics.jsonl"
URL_SCHEMES = ("gs", "s3", "az", "hf")


def is_url(path) -> bool:
  return "://" in str(path)


class _EpathEventFile:
  """A tensorboardX record writer for object stores: buffers the records and writes the
  whole object at each flush (tensorboardX's own GCS writer does the same, through
  google-cloud-storage; this one goes through etils.epath like every other output)."""

  def __init__(self, path: str):
    self.path = epath.Path(path)
    self.buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    self.path.write_bytes(self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EpathEventFactory:
  def open(self, path: str) -> _EpathEventFile:
    return _EpathEventFile(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def _register_tensorboard_schemes() -> None:
  from tensorboardX import record_writer

  for scheme in URL_SCHEMES:
    record_writer.register_writer_factory(scheme, _EpathEventFactory())


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(step: int, total: int, s: dict[str, float]) -> str:
  """`step 10/400 | loss 2.3 (itc 1.1 ...) | lr ... | gnorm ... | samples/s | ETA`."""
  parts = [f"step {step}/{total}", f"loss {s['loss']:.4f}"]
  per = [f"{k[5:]} {v:.3f}" for k, v in s.items() if k.startswith("loss/")]
  if per:
    parts[-1] += " (" + " ".join(per) + ")"
  parts.append(f"lr {s['lr']:.2e}")
  parts.append(f"gnorm {s['grad_norm']:.3f}")
  if "perf/samples_per_sec" in s:
    parts.append(f"{s['perf/samples_per_sec']:.1f} samples/s")
  if "perf/tflops_per_sec" in s:
    mfu = f" MFU {100 * s['perf/mfu']:.1f}%" if "perf/mfu" in s else ""
    parts.append(f"{s['perf/tflops_per_sec']:.3f} TFLOP/s{mfu}")
  if s.get("nonfinite_total"):
    parts.append(f"skipped {int(s['nonfinite_total'])} non-finite")
  if s.get("data/bad/total"):
    parts.append(f"bad samples {int(s['data/bad/total'])}")
  if "perf/eta_sec" in s:
    parts.append(f"ETA {_fmt_time(s['perf/eta_sec'])}")
  return " | ".join(parts)


def read_metrics(workdir) -> list[dict]:
  """The rows of `workdir/metrics.jsonl`; a torn last line (a crash mid-write) is dropped,
  a bad line elsewhere raises naming the file and line."""
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i == len(lines) - 1:
        logging.warning("%s: dropping a torn last line (%d bytes)", path, len(line))
        break
      raise ValueError(f"{path} line {i + 1} is not JSON: {line[:80]!r}") from None
  return rows


class MetricWriter:
  """Scalars to `metrics.jsonl` and TensorBoard (process 0 only). A resumed run drops the
  rows logged after its checkpoint: they are recomputed."""

  def __init__(self, workdir, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = epath.Path(workdir) / METRICS_FILE
    self.tb = None
    self._lines = None  # the whole file, kept for rewriting on a URL workdir
    if not enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    kept = ([json.dumps(r) + "\n" for r in read_metrics(workdir) if r["step"] <= resume_step]
            if self.path.exists() else [])
    self.path.write_text("".join(kept))
    if is_url(workdir):
      self._lines = kept
    try:
      from tensorboardX import SummaryWriter
      if is_url(workdir):
        _register_tensorboard_schemes()
      self.tb = SummaryWriter(str(epath.Path(workdir) / "tb"), purge_step=resume_step + 1)
    except ImportError:
      logging.warning("tensorboardX is not installed: no TensorBoard events")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    line = json.dumps({"step": step, **scalars}) + "\n"
    if self._lines is not None:
      self._lines.append(line)
      self.path.write_text("".join(self._lines))
    else:
      with self.path.open("a") as f:
        f.write(line)
    if self.tb is not None:
      for k, v in scalars.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self.tb.add_scalar(k, v, step)
      self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def plot_losses(workdir, out=None) -> str | None:
  """PNG of the total and per-objective losses over steps; None without matplotlib."""
  rows = read_metrics(workdir)
  if not rows:
    return None
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    logging.warning("matplotlib is not installed: no loss plot")
    return None
  keys = sorted({k for r in rows for k in r if k == "loss" or k.startswith("loss/")})
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for k in keys:
    pts = [(r["step"], r[k]) for r in rows if k in r and math.isfinite(r[k])]
    if pts:
      ax.plot(*zip(*pts), label=k, linewidth=2 if k == "loss" else 1)
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_title("training losses")
  ax.grid(alpha=0.3)
  ax.legend()
  out = epath.Path(out) if out else epath.Path(workdir) / "loss_curves.png"
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  plt.close(fig)
  out.write_bytes(buffer.getvalue())
  return str(out)
