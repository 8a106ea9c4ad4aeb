"""Orbax checkpoints of the train state and the data iterator.

  Checkpoints(workdir, config.checkpoint)
    .save(step, state, iterator=None, metrics=None, force=False)   async; every N steps
    .restore(abstract_state, iterator=None, step=None) -> (state, step)
    .latest_step(), .wait(), .close()
  PreemptionGuard: SIGTERM -> the step every process agrees to save at (JAX's preemption
                   sync point when jax.distributed is up, else a signal flag); the loop
                   saves (force=True) and exits.

Layout: `workdir/checkpoints/<step>/{state, data}`. `state` is the TrainState pytree
(`StandardSave`); `data` is the iterator's `get_state()` as JSON, one file per process
(`process_<i>-of-<n>.json`, as Grain's own handler), so any iterator with
`get_state()/set_state()` (our `DataIterator`, a Grain `DatasetIterator`) round-trips.

Atomic: orbax writes each step into a temporary directory and renames it when every item
is complete; a save killed mid-way leaves only the temporary directory, which is never
listed as a step (and is removed on the next start when `cleanup_tmp_directories`).

Retention: the last `keep` checkpoints plus the `keep_best` best by `best_metric`
(`best_mode` "min" or "max"), via orbax preservation policies.

Restoring onto another mesh: pass `abstract_state` as ShapeDtypeStructs carrying the new
shardings (`Trainer.abstract_sharded_state()`); orbax reads each array straight into that
layout, so a state saved on 8x1x1 restores on 2x2x2 without an intermediate full copy.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp


def default_checkpoint_config() -> ml_collections.ConfigDict:
  """`config.checkpoint`: every key this module reads."""
  c = ml_collections.ConfigDict()
  c.every_steps = 1000        # save interval (optimizer steps); the last step always saves
  c.keep = 3                  # last K checkpoints kept
  c.keep_best = 1             # plus the best N by `best_metric` (0 = none)
  c.best_metric = ""          # metrics key passed to save(), e.g. "eval/cider"; "" = none
  c.best_mode = "max"         # "max" | "min"
  c.async_save = True
  return c


# --------------------------------------------------------------------------------------
# The iterator item: any object with get_state() / set_state(), JSON per process.
# --------------------------------------------------------------------------------------


class IteratorHandler(ocp.CheckpointHandler):
  """Saves `iterator.get_state()` (JSON-able, or bytes) to one file per process."""

  def _file(self, directory: epath.Path) -> epath.Path:
    return epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def save(self, directory: epath.Path, args: "IteratorSave"):
    state = args.item.get_state()
    text = state.decode() if isinstance(state, bytes) else json.dumps(
        {"json": state}, indent=1)
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    self._file(directory).write_text(text)

  def restore(self, directory: epath.Path, args: "IteratorRestore"):
    path = self._file(directory)
    if not path.exists():
      raise FileNotFoundError(f"no iterator state {path} (saved with another process count?)")
    text = path.read_text()
    try:
      payload = json.loads(text)
      state = payload["json"] if isinstance(payload, dict) and "json" in payload else text.encode()
    except json.JSONDecodeError:
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


class Checkpoints:
  """Train-state + iterator checkpoints in `directory` (see the module docstring)."""

  def __init__(self, directory: str, c: ml_collections.ConfigDict | None = None):
    c = c or default_checkpoint_config()
    self.config = c
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
    self.directory = epath.Path(directory)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state: Any, iterator: Any = None,
           metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    """Starts an (async) save if `step` is due or `force`; returns whether it saves.

    The iterator state is captured now (synchronously), the arrays are copied to host
    before returning, so the caller may keep training (and donate `state`) immediately.
    """
    items = {"state": ocp.args.StandardSave(state)}
    if iterator is not None:
      items["data"] = IteratorSave(iterator)
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    return self.manager.save(int(step), args=ocp.args.Composite(**items), metrics=metrics,
                             force=force)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def restore(self, abstract_state: Any, iterator: Any = None,
              step: int | None = None) -> tuple[Any, int]:
    """Restores the state (into the shardings of `abstract_state`) and the iterator."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if iterator is not None:
      items["data"] = IteratorRestore(iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], step

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
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
  process must call `should_stop` at every step, from the same start step. Python's signal
  handler would replace that notifier's, so it is only installed for a single process
  without `jax.distributed`, where a flag is enough. The previous handler is restored on
  exit.
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
