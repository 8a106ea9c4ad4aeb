"""A small multi-process training-like loop for tests/test_launch.py: a state sharded over
every process's devices, a step with a cross-process reduction, `PreemptionGuard` and
`Checkpoints` exactly as the train loop uses them. Writes `<workdir>/status_<i>.json`.

  python tests/preemption_worker.py WORKDIR TOTAL_STEPS
"""

from __future__ import annotations

import json
import sys
import time

from etils import epath


def main(workdir: str, total: int) -> None:
  from mplug2_jax import distributed

  distributed.initialize(distributed.make_plan())
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from mplug2_jax.train import checkpointing

  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  n = 2 * jax.device_count()
  state = {"x": jax.make_array_from_callback(
      (n,), sharding, lambda idx: np.arange(n, dtype=np.float32)[idx]),
           "step": jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(mesh, P()))}

  @jax.jit
  def step_fn(s):  # the sum crosses processes: a host that stopped early would hang it
    x = s["x"]
    return {"x": jnp.sin(x) + 0.01 * jnp.sum(x), "step": s["step"] + 1}

  config = checkpointing.default_checkpoint_config()
  config.every_steps = 1000
  ckpt = checkpointing.Checkpoints(str(epath.Path(workdir) / "checkpoints"), config)
  start = 0
  if ckpt.latest_step() is not None:
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                            sharding=a.sharding), state)
    state, start = ckpt.restore(abstract)
  status, step = "done", start
  me = jax.process_index()
  progress = epath.Path(workdir) / f"progress_{me}"
  with checkpointing.PreemptionGuard() as guard:
    for step in range(start + 1, total + 1):
      state = step_fn(state)
      jax.block_until_ready(state)
      progress.write_text(str(step))
      time.sleep(0.05)
      if guard.should_stop(step, ckpt):
        ckpt.save(step, state, force=True)
        status = "preempted"
        break
  ckpt.close()
  x = np.asarray(jax.experimental.multihost_utils.process_allgather(state["x"], tiled=True))
  (epath.Path(workdir) / f"status_{me}.json").write_text(json.dumps(
      {"status": status, "step": step, "start": start, "state_step": int(state["step"]),
       "x": x.tolist(), "synchronised": guard.synchronised}))


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]))
