"""Orbax checkpoints of the train state and the data iterator, verified on restore.

  Checkpoints(workdir, config.checkpoint)
    .save(step, state, iterator=None, metrics=None, force=False)   async; every N steps
    .check()              raises CheckpointSaveError once an asynchronous save has failed
    .restore(abstract_state, iterator=None, step=None) -> (state, step)
    .latest_step(), .wait(), .close()
  PreemptionGuard: SIGTERM -> the step every process agrees to save at (JAX's preemption
                   sync point when jax.distributed is up, else a signal flag); the loop
                   saves (force=True) and exits.

Layout: `workdir/checkpoints/<step>/{state, data, digests}`. `state` is the TrainState
pytree (`StandardSave`); `data` is the iterator's `get_state()` as JSON, one file per
process (`process_<i>-of-<n>.json`, as Grain's own handler), so any iterator with
`get_state()/set_state()` (our `DataIterator`, a Grain `DatasetIterator`) round-trips;
`digests` is the manifest: two 32-bit checksums of every array of the state (`digests`).

Atomic: orbax writes each step into a temporary directory and renames it when every item
is complete; a save killed mid-way leaves only the temporary directory, which is never
listed as a step (and is removed on the next start when `cleanup_tmp_directories`).

Verified: a restored state must match its manifest and hold only finite values. A
checkpoint that does not (flipped bytes, a truncated file, an unreadable iterator state:
any error while restoring it) is reported loudly, moved to `checkpoints.unusable/` and the
previous one is tried (`on_corrupt="fallback"`), or the run stops (`on_corrupt="fail"`);
with none left the restore fails naming every problem. A run never trains on a state it
could not verify. Checkpoints written without a manifest restore with a warning.

Failed saves: a save that fails (a full disk, a lost bucket) raises `CheckpointSaveError`
(one line: the step, the directory, the error, the space needed and free) from `check()`
or the next `save()`, and orbax does not then delete the older checkpoints (which it would
otherwise do after every save, failed or not), so the last good one stays.

Retention: the last `keep` checkpoints plus the `keep_best` best by `best_metric`
(`best_mode` "min" or "max"), via orbax preservation policies.

Restoring onto another mesh: pass `abstract_state` as ShapeDtypeStructs carrying the new
shardings (`Trainer.abstract_sharded_state()`); orbax reads each array straight into that
layout, so a state saved on 8x1x1 restores on 2x2x2 without an intermediate full copy.
"""

from __future__ import annotations

import dataclasses
import json
import logging as std_logging
import os
import shutil
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from mplug2_jax import param_store, sharding


def default_checkpoint_config() -> ml_collections.ConfigDict:
  """`config.checkpoint`: every key this module reads."""
  c = ml_collections.ConfigDict()
  c.every_steps = 1000        # save interval (optimizer steps); the last step always saves
  c.keep = 3                  # last K checkpoints kept
  c.keep_best = 1             # plus the best N by `best_metric` (0 = none)
  c.best_metric = ""          # metrics key passed to save(), e.g. "eval/cider"; "" = none
  c.best_mode = "max"         # "max" | "min"
  c.async_save = True
  c.on_corrupt = "fallback"   # a checkpoint that fails verification on restore: "fallback"
                              # (to the previous good one, loudly) | "fail" (stop the run)
  return c


ON_CORRUPT = ("fallback", "fail")
DIGESTS = "digests"  # the manifest item of each step


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; `str()` is one line naming the step and path."""


class CorruptCheckpointError(RuntimeError):
  """No checkpoint could be restored and verified; `str()` names each problem."""


def _first_line(e: BaseException, limit: int = 300) -> str:
  text = str(e).strip() or type(e).__name__
  return text.splitlines()[0][:limit]


def _size(n: int) -> str:
  return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _cause(e: BaseException) -> BaseException:
  """The innermost explicit cause of `e` with a message (orbax wraps handler errors)."""
  seen = set()
  while e.__cause__ is not None and id(e) not in seen and str(e.__cause__).strip():
    seen.add(id(e))
    e = e.__cause__
  return e


# --------------------------------------------------------------------------------------
# The digest manifest.
# --------------------------------------------------------------------------------------


def _words(x: jax.Array) -> jax.Array:
  """The array's bits as a flat uint32 vector (narrower types widened, 64-bit ones split)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = jnp.dtype(x.dtype).itemsize
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


def _leaf_digest(x: jax.Array) -> jax.Array:
  """Two 32-bit checksums of an array's bits: the word sum and the sum weighted by the odd
  number 2i + 1 (integer sums wrap, so the result is exact on any mesh and in any order).
  Any one changed word changes both; a swap of two words changes the second. They detect
  accidental damage (flipped bytes, zeroed or truncated blocks), not deliberate forgery."""
  w = _words(x)
  weights = jnp.arange(w.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
  return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * weights, dtype=jnp.uint32)])


def _leaf_finite(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.all(jnp.isfinite(x))
  return jnp.bool_(True)


@jax.jit
def _digests_and_finite(tree: Any) -> tuple[dict, dict]:
  leaves = sharding.flat(tree)
  return ({k: _leaf_digest(v) for k, v in leaves.items()},
          {k: _leaf_finite(v) for k, v in leaves.items()})


def digests(tree: Any) -> tuple[dict[str, list[int]], list[str]]:
  """({leaf path: [sum, weighted sum]}, [paths of leaves with a non-finite value]) of a
  pytree of arrays (sharded or not; every process must call it)."""
  sums, finite = jax.device_get(_digests_and_finite(tree))
  return ({k: [int(a) for a in np.asarray(v)] for k, v in sums.items()},
          [k for k, ok in finite.items() if not bool(ok)])


# --------------------------------------------------------------------------------------
# The iterator item: any object with get_state() / set_state(), JSON per process.
# --------------------------------------------------------------------------------------


class IteratorHandler(ocp.CheckpointHandler):
  """Saves `iterator.get_state()` (JSON-able, or bytes) to one file per process."""

  def _file(self, directory: epath.Path) -> epath.Path:
    return epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def save(self, directory: epath.Path, args: "IteratorSave"):
    state = args.item.get_state()
    payload = {"bytes": state.decode()} if isinstance(state, bytes) else {"json": state}
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    self._file(directory).write_text(json.dumps(payload, indent=1))

  def restore(self, directory: epath.Path, args: "IteratorRestore"):
    """Sets the iterator's state; a file that is not the JSON `save` writes (truncated,
    damaged) raises naming it."""
    path = self._file(directory)
    if not path.exists():
      raise FileNotFoundError(f"no iterator state {path} (saved with another process count?)")
    text = path.read_text()
    try:
      payload = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"iterator state {path} is not valid JSON (truncated or damaged: "
                       f"{e.msg} at line {e.lineno} column {e.colno})") from None
    if isinstance(payload, dict) and "json" in payload:
      state = payload["json"]
    elif isinstance(payload, dict) and "bytes" in payload:
      state = payload["bytes"].encode()
    else:  # a state saved verbatim (JSON bytes of a Grain iterator)
      state = text.encode()
    args.item.set_state(state)
    return args.item

  def metadata(self, directory: epath.Path):
    return None

  def structure(self, directory: epath.Path):
    return None

  def finalize(self, directory: epath.Path):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(IteratorHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(IteratorHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
  item: Any


# --------------------------------------------------------------------------------------
# The manager.
# --------------------------------------------------------------------------------------


class _Manager(ocp.CheckpointManager):
  """Orbax's manager, except that a failed save is kept as one `CheckpointSaveError`.

  Orbax's finalize step (`_finalize`, run in its own thread after an asynchronous save)
  waits for the writes and then deletes the steps beyond `keep`; a write error raises
  before the deletion, so the last good checkpoint stays. The error is recorded here
  (`save_error`, made by `describe(step, error)`) as soon as it happens, so the loop's
  per-step `check()` sees it without waiting.
  """

  describe = staticmethod(lambda step, error: str(error))
  save_error: CheckpointSaveError | None = None

  def _finalize(self, step: int, steps_to_remove):
    try:
      return super()._finalize(step, steps_to_remove)
    except Exception as e:  # noqa: BLE001  (any failure of the save is reported)
      if self.save_error is None:
        self.save_error = CheckpointSaveError(self.describe(step, e))
      raise self.save_error from e

  def _finalize_checkpoint(self, step: int):
    # Orbax only logs a failed commit here and goes on; raising keeps it from finishing.
    self.check_for_errors()
    return super()._finalize_checkpoint(step)

  def reached_preemption(self, step: int) -> bool:
    """False: JAX's preemption sync point is `PreemptionGuard`'s alone.

    The sync point remembers the step of its latest call, and when a notice arrives every
    process publishes that step and all stop at the largest + 1. Orbax's manager calls it
    too (`should_save`, `save`, and on the primary host from the finalize thread of an
    asynchronous save, with the step of that save): that rewinds the remembered step, the
    process publishes a step older than its loop, the agreed stop step can be one it has
    already passed, and it trains on alone while the others wait for it in the save's
    collectives. The loop saves at the agreed step itself (`save(..., force=True)`).
    """
    del step
    return False


def _is_closed_loop(exc: BaseException | None) -> bool:
  return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _silence_closed_loop_reports() -> None:
  """Drops the "Event loop is closed" reports of TensorStore threads after a failed write.

  Orbax closes its writer's event loop at the first failed write while TensorStore still
  completes the other writes; each completion's `call_soon_threadsafe` then raises in a
  library thread, which Python reports through `sys.excepthook` / `sys.unraisablehook`
  (a few hundred tracebacks for a small model). The failure itself is reported once, by
  `CheckpointSaveError`; every other exception still reaches the previous hooks.
  """
  import sys

  if getattr(sys.excepthook, "_drops_closed_loop", False):
    return
  except_hook, unraisable_hook = sys.excepthook, sys.unraisablehook

  def excepthook(kind, value, tb):
    if not _is_closed_loop(value):
      except_hook(kind, value, tb)

  def unraisablehook(unraisable):
    if not _is_closed_loop(unraisable.exc_value):
      unraisable_hook(unraisable)

  excepthook._drops_closed_loop = True
  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
  thread_hook = threading.excepthook

  def thread_excepthook(args):
    if not _is_closed_loop(args.exc_value):
      thread_hook(args)

  threading.excepthook = thread_excepthook


class _OneLine(std_logging.Filter):
  """Orbax logs each failed write with a traceback from several threads; the failure is
  reported once by `CheckpointSaveError`, so its records keep their first line only."""

  def filter(self, record):
    if record.exc_info and "orbax" in (record.pathname or ""):
      record.msg, record.args = _first_line(Exception(record.getMessage())), None
      record.exc_info, record.exc_text = None, None
    return True


std_logging.getLogger("absl").addFilter(_OneLine())


class Checkpoints:
  """Train-state + iterator checkpoints in `directory` (see the module docstring)."""

  def __init__(self, directory: str, c: ml_collections.ConfigDict | None = None):
    _silence_closed_loop_reports()
    c = c or default_checkpoint_config()
    self.config = c
    self.on_corrupt = c.get("on_corrupt", "fallback")
    if self.on_corrupt not in ON_CORRUPT:
      raise ValueError(f"checkpoint.on_corrupt={self.on_corrupt!r}: one of {ON_CORRUPT}")
    policies = [pp.LatestN(n=int(c.keep))]
    if c.best_metric and c.keep_best:
      metric, sign = c.best_metric, 1.0 if c.best_mode == "max" else -1.0
      policies.append(pp.BestN(get_metric_fn=lambda m: sign * float(m[metric]),
                               n=int(c.keep_best), keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=int(c.every_steps),
        preservation_policy=pp.AnyPreservationPolicy(policies),
        enable_async_checkpointing=bool(c.async_save),
        cleanup_tmp_directories=True,
        create=True)
    self.directory = param_store.resolve(directory)  # orbax needs an absolute path
    self.manager = _Manager(self.directory, options=options,
                            item_names=("state", "data", DIGESTS))
    self.manager.describe = self._describe_failure
    self._bytes_per_save = 0
    self._step_in_flight = -1
    self._raised: CheckpointSaveError | None = None  # the failure the caller has seen

  # ---- saving ----------------------------------------------------------------------------

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state: Any, iterator: Any = None,
           metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    """Starts an (async) save if `step` is due or `force`; returns whether it saves.

    The iterator state and the digest manifest are captured now (synchronously), the arrays
    are copied to host before returning, so the caller may keep training (and donate
    `state`) immediately. Raises CheckpointSaveError when this or an earlier save failed.
    """
    self.check()
    if not (force or self.manager.should_save(int(step))):
      return False
    sums, _ = digests(state)
    items = {"state": ocp.args.StandardSave(state),
             DIGESTS: ocp.args.JsonSave({"checksum": "uint32 word sum, odd-weighted sum",
                                         "leaves": sums})}
    if iterator is not None:
      items["data"] = IteratorSave(iterator)
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    self._step_in_flight = int(step)
    try:
      return self.manager.save(int(step), args=ocp.args.Composite(**items), metrics=metrics,
                               force=True)
    except Exception as e:  # noqa: BLE001  (reported in one line; the chain is kept)
      # An earlier asynchronous save re-raised by orbax, or this one failing at once.
      self._raised = self.manager.save_error or CheckpointSaveError(
          self._describe_failure(int(step), e))
      raise self._raised from e

  def check(self) -> None:
    """Raises CheckpointSaveError if an asynchronous save has failed (cheap; the loop
    calls it every step, so a run stops at its first failed save)."""
    if self.manager.save_error is not None:
      self._raised = self.manager.save_error
      raise self._raised

  def _describe_failure(self, step: int, error: BaseException) -> str:
    cause = _cause(error)
    text = _first_line(cause, 2000).replace(str(self.directory) + "/", "")
    if len(text) > 400:  # keep the end: that is where the OS error is
      text = text[:150] + " ... " + text[-240:]
    line = f"checkpoint of step {step} could not be written to {self.directory}: {text}"
    if "://" not in str(self.directory):  # sizes of a local disk (a bucket has no "free")
      try:
        local = str(self.directory)
        if self._bytes_per_save == 0:
          previous = [n for n in os.listdir(local) if n.isdigit()]
          if previous:
            last = os.path.join(local, max(previous, key=int))
            self._bytes_per_save = sum(os.path.getsize(os.path.join(d, f))
                                       for d, _, files in os.walk(last) for f in files)
        if self._bytes_per_save:
          line += f"; a checkpoint takes about {_size(self._bytes_per_save)}"
        line += f", {_size(shutil.disk_usage(local).free)} free"
      except OSError:
        pass
    try:  # finished steps on disk (orbax's own list may already hold the failed one)
      good = [int(p.name) for p in self.directory.iterdir()
              if p.name.isdigit() and int(p.name) != step]
    except OSError:
      good = []
    if good:
      line += f"; the checkpoint of step {max(good)} is intact"
    return line

  # ---- restoring -------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def restore(self, abstract_state: Any, iterator: Any = None,
              step: int | None = None) -> tuple[Any, int]:
    """Restores and verifies the state (into the shardings of `abstract_state`) and the
    iterator: the latest usable checkpoint, or exactly `step` when given (see the module
    docstring for what happens to a checkpoint that fails)."""
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    problems: list[tuple[int, str]] = []
    for s in steps:
      try:
        state = self._restore_verified(s, abstract_state, iterator)
      except Exception as e:  # noqa: BLE001  (any failure makes the checkpoint unusable)
        problem = f"checkpoint {self.directory / str(s)} is unusable: {_first_line(_cause(e))}"
        problems.append((s, problem))
        if self.on_corrupt == "fail" or step is not None:
          raise CorruptCheckpointError(
              problem + ("; checkpoint.on_corrupt='fail'" if step is None else "")) from e
        logging.error("\n%s\n%s; trying the previous checkpoint\n%s", "!" * 80, problem,
                      "!" * 80)
        continue
      if problems:
        self._set_aside([p for p, _ in problems])
        logging.warning("\n%s\nRESUMING FROM STEP %d, not %d: the newer checkpoints failed "
                        "verification and were moved to %s\n%s", "!" * 80, s,
                        problems[0][0], self._unusable_dir(), "!" * 80)
      return state, s
    raise CorruptCheckpointError(f"no usable checkpoint in {self.directory}: "
                                 + "; ".join(p for _, p in problems))

  def _restore_verified(self, step: int, abstract_state: Any, iterator: Any) -> Any:
    step_dir = self.directory / str(step)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if iterator is not None:
      items["data"] = IteratorRestore(iterator)
    has_manifest = (step_dir / DIGESTS).exists()
    if has_manifest:
      items[DIGESTS] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    state = restored["state"]
    sums, nonfinite = digests(state)
    if has_manifest:
      saved = restored[DIGESTS]["leaves"]
      bad = sorted(k for k in set(saved) | set(sums) if saved.get(k) != sums.get(k))
      if bad:
        raise ValueError(f"{len(bad)} of {len(saved)} arrays differ from the digest manifest "
                         f"(damaged files), e.g. {', '.join(bad[:3])}")
    else:
      logging.warning("checkpoint %s has no digest manifest (written by an older version): "
                      "restored without verification", step_dir)
    if nonfinite:
      raise ValueError(f"non-finite values in {len(nonfinite)} arrays, e.g. "
                       f"{', '.join(nonfinite[:3])}")
    return state

  def _unusable_dir(self) -> epath.Path:
    return self.directory.parent / (self.directory.name + ".unusable")

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unusable checkpoints out of the way (kept for inspection), so that the run
    can save those steps again."""
    if jax.process_index() == 0:
      target = self._unusable_dir()
      target.mkdir(parents=True, exist_ok=True)
      for s in steps:
        (self.directory / str(s)).rename(target / f"{s}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("mplug2_jax checkpoints set aside")
    self.manager.reload()

  # ---- waiting ---------------------------------------------------------------------------

  def wait(self) -> None:
    """Waits for the in-flight save; raises CheckpointSaveError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      self._raised = self.manager.save_error or CheckpointSaveError(
          self._describe_failure(self._step_in_flight, e))
      raise self._raised from e

  def close(self) -> None:
    """Waits for in-flight saves and closes; a failure already raised by `check`/`save`
    is not raised again."""
    seen = self._raised
    try:
      self.wait()
    except CheckpointSaveError as e:
      if e is not seen:
        self.manager.close()
        raise
    self.manager.close()


class PreemptionGuard:
  """Preemption notices (SIGTERM) -> the step at which every process saves and stops.

    with PreemptionGuard() as guard:
      for step ...:
        ...
        if guard.should_stop(step):
          ckpt.save(step, state, it, force=True); break

  With `jax.distributed` initialised (any multi-process run, and TPU VMs) the decision is
  JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`): the
  coordination service's notifier catches SIGTERM on whichever host gets it, every host
  reports its step, and all of them return True at the same step (the largest reported + 1),
  so a pod saves one consistent checkpoint instead of hanging in a collective. Every
  process must call `should_stop` at every step, from the same start step, and nothing
  else may call the sync point (`_Manager.reached_preemption` keeps orbax from it).
  Python's signal handler would replace that notifier's, so it is only installed for a
  single process without `jax.distributed`, where a flag is enough. The previous handler
  is restored on exit.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self.signals = tuple(signals)
    self._event = threading.Event()
    self._previous = {}
    self.synchronised = False

  def _handler(self, signum, frame):
    del frame
    self._event.set()

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def should_stop(self, step: int, checkpoints: Checkpoints | None = None) -> bool:
    """True at the step where this process (and every other one) saves and stops."""
    del checkpoints  # kept for callers; the sync point does not depend on it
    if self.synchronised:
      from jax.experimental import multihost_utils

      return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    return self.requested

  def __enter__(self):
    self.synchronised = jax.distributed.is_initialized()
    if not self.synchronised:
      for s in self.signals:
        self._previous[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc):
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous = {}
    return False
