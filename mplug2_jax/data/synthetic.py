"""Random batches in the model family's batch schema, for timing runs and tests: no
dataset needed. Only used when a config asks for it (`synthetic_data=True`)."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from mplug2_jax.models import registry


class SyntheticIterator:
  """Global batches that are a pure function of (seed, position), sliced per process.

  Every process computes the same global batch and keeps its rows, so the global batch does
  not depend on the process count. Checkpointable like the real iterator.
  """

  def __init__(self, config: ml_collections.ConfigDict, batch_sharding, seed: int = 0):
    self.family = registry.of(config.model)
    self.model_cfg = config.model
    self.schema = self.family.batch_schema(config.model, config.data, int(config.batch_size))
    self.sharding, self.seed, self.position = batch_sharding, seed, 0

  def global_batch(self, position: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, position])
    return self.family.synthetic_batch(self.model_cfg, self.schema, rng)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    batch = self.global_batch(self.position)
    self.position += 1
    count, index = jax.process_count(), jax.process_index()
    out = {}
    for k, v in batch.items():
      rows = v.shape[0] // count
      out[k] = jax.make_array_from_process_local_data(self.sharding,
                                                      v[index * rows:(index + 1) * rows])
    return out

  def metrics(self) -> dict[str, int]:
    return {}

  def get_state(self) -> dict[str, int]:
    return {"position": self.position}

  def set_state(self, state: dict[str, int]) -> None:
    self.position = int(state["position"])

  def close(self) -> None:
    pass
