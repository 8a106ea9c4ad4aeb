"""The train state and everything a run needs to build, shard and restore it.

  TrainState(step, params, opt_state, extra, rng, nonfinite, nonfinite_total)

`extra` is the state the model family's objectives keep between steps (mPLUG-2: the
momentum model and ITC queues of retrieval / pre-training; {} otherwise). `rng` is stored
as raw key data (uint32) so that checkpoints do not depend on typed-key support; the step
wraps it with the default PRNG implementation.

Shardings: params by the logical rules (`sharding.logical_shardings`); leaves of the
optimizer state and of `extra` that mirror a parameter (Adam moments, the EMA copy) take
that parameter's sharding, found by matching the parameter path at the end of the leaf's
path; the rest (counts, queues, rng) is replicated.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mplug2_jax import param_store, sharding
from mplug2_jax.models import registry
from mplug2_jax.train import optimizer as optimizer_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array             # int32 (): optimizer steps taken (skipped steps not counted)
  params: Any
  opt_state: Any
  extra: Any                  # the family objectives' state between steps ({} if none)
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


class TrainSetup:
  """One run's model, objective, optimizer and state shardings: what the step, the
  checkpoints and the loop share. `example_batch` (arrays or ShapeDtypeStructs) gives
  the batch structure; parameter init traces a one-row stand-in of it."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, example_batch: dict):
    self.config, self.mesh = config, mesh
    self.family = registry.of(config.model)
    self.model = self.family.build(config.model, deterministic=False)
    self.objectives = self.family.objectives
    self.objective = config.objective
    self.opt_config = config.optimizer
    self.example_batch = jax.tree.map(
        lambda x: jnp.zeros((1,) + tuple(x.shape[1:]), x.dtype), example_batch)
    init_model = self.family.build(config.model)
    self.param_shardings = sharding.param_shardings(init_model, self.example_batch, mesh, config)
    with sharding.activate(mesh, config):
      self.abstract_params = sharding.unboxed(
          sharding.abstract_params(init_model, self.example_batch))
    self.tx, self.lr_fn = optimizer_lib.make(self.opt_config, self.abstract_params,
                                             int(config.total_steps))
    # Local batches of the objectives (one per data x fsdp slice of the batch axis).
    self.batch_shards = sharding.batch_ways(mesh, config)
    self.abstract_state = jax.eval_shape(self._init, jax.random.key_data(jax.random.key(0)))
    self.state_shardings = self._shardings(self.abstract_state)
    self._jitted_init = None

  def _init(self, key_data) -> TrainState:
    rng = jax.random.wrap_key_data(key_data)
    k_params, k_extra, k_train = jax.random.split(rng, 3)
    variables = self.family.build(self.config.model).init(
        {"params": k_params, "dropout": k_params}, self.example_batch)
    params = nn.meta.unbox(variables["params"])
    extra = self.objectives.init_extra(k_extra, params, self.config.model, self.objective)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=self.tx.init(params), extra=extra,
                      rng=jax.random.key_data(k_train), nonfinite=zero, nonfinite_total=zero)

  def _shardings(self, abstract: TrainState) -> TrainState:
    replicated = NamedSharding(self.mesh, P())
    follow = lambda tree: follow_params(tree, self.param_shardings, self.abstract_params,
                                        self.mesh)
    return TrainState(step=replicated, params=self.param_shardings,
                      opt_state=follow(abstract.opt_state), extra=follow(abstract.extra),
                      rng=replicated, nonfinite=replicated, nonfinite_total=replicated)

  def init(self, seed: int | None = None) -> TrainState:
    """The initial state, created directly in its sharded layout."""
    seed = int(self.config.seed if seed is None else seed)
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

  def with_initial_params(self, state: TrainState, directory: str) -> TrainState:
    """`state` with every parameter found in the parameters directory `directory`
    (`param_store`) placed straight into its sharding; a shape mismatch raises, parameters
    missing from the directory keep their initial values (logged), and the objectives'
    momentum copies restart from the loaded parameters."""
    loaded = sharding.flat(param_store.load_params(directory))
    ours = sharding.flat(state.params)
    mismatched = [f"{k}: checkpoint {loaded[k].shape}, model {ours[k].shape}"
                  for k in ours if k in loaded and loaded[k].shape != ours[k].shape]
    if mismatched:
      raise ValueError(f"init_checkpoint {directory}: parameter shapes differ from the "
                       f"model's: " + "; ".join(mismatched[:8]))
    missing = sorted(set(ours) - set(loaded))
    unused = sorted(set(loaded) - set(ours))
    host = {k: (np.asarray(loaded[k]).astype(v.dtype) if k in loaded else v)
            for k, v in ours.items()}
    params = sharding.place(param_store.nest(host), self.param_shardings)
    logging.info("init_checkpoint %s: %d parameters loaded, %d kept from init %s, %d unused %s",
                 directory, len(ours) - len(missing), len(missing), missing[:8], len(unused),
                 unused[:8])
    return state.replace(params=params,
                         extra=self.objectives.reset_momentum(state.extra, params))
