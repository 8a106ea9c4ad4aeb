"""The train state: one pytree, created sharded (shapes first, then a jitted init).

  TrainState(step, params, opt_state, ema_params, queues, rng, nonfinite, nonfinite_total)

`ema_params` (momentum model: the ITC feature path) and `queues` are empty dicts for tasks
without ITC. `rng` is stored as raw key data (uint32) so that checkpoints do not depend on
typed-key support; the step wraps it with the default PRNG implementation.

Shardings: params by the logical rules (`sharding.logical_shardings`); optimizer-state
leaves that mirror a parameter (Adam moments) take that parameter's sharding, found by
matching the parameter path at the end of the leaf's path; EMA params follow params; the
rest (counts, queues, rng) is replicated.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mplug2_jax import sharding
from mplug2_jax.models import mplug2
from mplug2_jax.train import objectives
from mplug2_jax.train import optimizer as optimizer_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array             # int32 (): optimizer steps taken (skipped steps not counted)
  params: Any
  opt_state: Any
  ema_params: Any             # {} unless the task uses the momentum model
  queues: Any                 # {} unless the task uses ITC queues
  rng: jax.Array              # uint32 raw key data; folded with `step` every step
  nonfinite: jax.Array        # int32 (): consecutive skipped (non-finite) steps
  nonfinite_total: jax.Array  # int32 (): all skipped steps


def _keys(path) -> tuple:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def follow_params(tree: Any, param_shardings: Any, abstract_params: Any, mesh: Mesh) -> Any:
  """Shardings for `tree` (e.g. an optimizer state): a leaf whose dict-key path ends with a
  parameter's path and has its shape gets that parameter's sharding; others replicate."""
  shapes = {_keys(p): v.shape for p, v in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  by_path = {}
  for path, s in jax.tree_util.tree_flatten_with_path(
      param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0]:
    by_path[_keys(path)] = (s, shapes[_keys(path)])
  replicated = NamedSharding(mesh, P())

  def one(path, leaf):
    keys = _keys(path)
    for i in range(len(keys)):
      found = by_path.get(keys[i:])
      if found is not None and found[1] == getattr(leaf, "shape", None):
        return found[0]
    return replicated

  return jax.tree_util.tree_map_with_path(one, tree)


class Trainer:
  """Model, optimizer and state shardings of one run (everything the step needs)."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, example_batch: dict):
    self.config, self.mesh = config, mesh
    self.model = mplug2.build(config.model, deterministic=False)
    self.objective = config.get("objective", objectives.default_objective_config())
    self.opt_config = config.get("optimizer", optimizer_lib.default_optimizer_config())
    # Parameters do not depend on the batch size: init traces a one-row stand-in, so the
    # example batch may be abstract (ShapeDtypeStructs) and of any (pod-scale) size.
    self.example_batch = jax.tree.map(
        lambda x: jnp.zeros((1,) + tuple(x.shape[1:]), x.dtype), example_batch)
    with sharding.activate(mesh, config):
      boxed = sharding.abstract_params(mplug2.build(config.model), self.example_batch)
      self.param_shardings = sharding.logical_shardings(boxed, mesh, config)
    self.abstract_params = sharding.unboxed(boxed)
    self.tx, self.lr_fn = optimizer_lib.make(self.opt_config, self.abstract_params,
                                             int(config.get("total_steps", 0)))
    self.abstract_state = jax.eval_shape(self._init, jax.random.key_data(jax.random.key(0)))
    self.state_shardings = self._shardings(self.abstract_state)
    self._jitted_init = None

  @property
  def uses_momentum(self) -> bool:
    return objectives.uses_momentum(self.config.model.task)

  def _init(self, key_data) -> TrainState:
    rng = jax.random.wrap_key_data(key_data)
    k_params, k_queue, k_train = jax.random.split(rng, 3)
    variables = mplug2.build(self.config.model).init(
        {"params": k_params, "dropout": k_params}, self.example_batch)
    params = nn.meta.unbox(variables["params"])
    ema, queues = {}, {}
    if self.uses_momentum:
      ema = jax.tree.map(jnp.copy, objectives.momentum_subset(params))
      queues = objectives.init_queues(k_queue, int(self.objective.queue_size),
                                      int(self.config.model.embed_dim))
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=self.tx.init(params),
                      ema_params=ema, queues=queues, rng=jax.random.key_data(k_train),
                      nonfinite=zero, nonfinite_total=zero)

  def _shardings(self, abstract: TrainState) -> TrainState:
    replicated = NamedSharding(self.mesh, P())
    rep = lambda tree: jax.tree.map(lambda _: replicated, tree)
    return TrainState(
        step=replicated, params=self.param_shardings,
        opt_state=follow_params(abstract.opt_state, self.param_shardings,
                                self.abstract_params, self.mesh),
        ema_params=follow_params(abstract.ema_params, self.param_shardings,
                                 self.abstract_params, self.mesh),
        queues=rep(abstract.queues), rng=replicated, nonfinite=replicated,
        nonfinite_total=replicated)

  def init(self, seed: int | None = None) -> TrainState:
    """The initial state, created directly in its sharded layout."""
    seed = int(self.config.get("seed", 0) if seed is None else seed)
    key_data = jax.random.key_data(jax.random.key(seed))
    if self._jitted_init is None:
      self._jitted_init = jax.jit(self._init, out_shardings=self.state_shardings)
    with sharding.activate(self.mesh, self.config):
      return self._jitted_init(key_data)

  def abstract_sharded_state(self) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings (restore onto this mesh)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_state, self.state_shardings)

  def param_groups(self) -> dict[str, str]:
    return optimizer_lib.param_groups(self.abstract_params, self.opt_config)
