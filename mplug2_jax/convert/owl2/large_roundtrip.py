r"""The 7B conversion both ways through sharded safetensors, with peak host memory.

    python -m mplug2_jax.convert.owl2.large_roundtrip --workdir /tmp/owl2_rt [--llm_layers 32] \
        [--dtype bfloat16]

1. writes random official weights of the 7B layout (`official.layout`: every parameter
   and buffer key, regenerated buffers) as an HF directory: one shard per LLM layer plus
   one for the rest, `model.safetensors.index.json` and `config.json`, streamed shard by
   shard (own process);
2. `import-official` into a parameters directory, in a fresh process (peak RSS printed);
3. `export-official` back to an HF directory, in a fresh process;
4. checks every tensor of the export against the original, bit for bit, shard by shard.

`--llm_layers` below 32 keeps every tensor at its 7B size but fewer decoder layers (one
layer is 236,003,328 parameters, 0.88 GiB in float32), so the run fits a small machine;
the memory per layer is then read off two runs. `--dtype bfloat16` writes the weights in
bfloat16 and imports them into bfloat16 parameters (`model.param_dtype`): the whole 7B at
half the float32 memory.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/owl2_large_roundtrip", "Scratch directory.")
_LAYERS = flags.DEFINE_integer("llm_layers", 32, "Decoder layers (32 = the released 7B).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Dtype of the weights (buffers keep theirs) and of the parameters.")
_STAGE = flags.DEFINE_string("stage", None, "internal: run one stage in this process.")

CONFIG = "{repo}/configs/owl2.py:7b"


def model_config(layers: int):
  from mplug2_jax.models.owl2 import config as owl2_config

  m = owl2_config.model_config("7b")
  m.llm.layers = layers
  return m


def write_random_checkpoint(directory: pathlib.Path, layers: int, dtype: str) -> None:
  import json
  import time

  import jax.numpy as jnp
  import numpy as np

  from mplug2_jax.convert import checkpoints
  from mplug2_jax.convert.owl2 import official, shard_of

  start = time.perf_counter()
  m = model_config(layers)
  rng = np.random.default_rng(0)
  buffers = official.buffers(m)
  shard, count = shard_of(m)
  layout = official.layout(m)

  def tensors():
    for key in sorted(layout, key=shard):
      if key in buffers:
        yield key, buffers[key]
      else:
        weight = rng.standard_normal(layout[key], dtype=np.float32) * np.float32(0.02)
        yield key, weight.astype(jnp.dtype(dtype))

  checkpoints.write_sharded(tensors(), directory, shard, count)
  (directory / "config.json").write_text(json.dumps(official.official_config(m, dtype),
                                                    indent=2))
  params = sum(int(np.prod(s)) for k, s in layout.items() if k not in buffers)
  size = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
  print(f"wrote {len(layout)} tensors ({params:,} parameters, {size / 2**30:.2f} GiB) in "
        f"{count} shards to {directory} in {time.perf_counter() - start:.1f}s")


def compare(original: pathlib.Path, exported: pathlib.Path) -> None:
  import numpy as np

  from mplug2_jax.convert import checkpoints

  a, b = checkpoints.open_state_dict(original), checkpoints.open_state_dict(exported)
  if set(a) != set(b):
    raise SystemExit(f"key sets differ: {sorted(set(a) ^ set(b))[:5]}")
  for key in a:
    x, y = a[key], b[key]
    if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y):
      raise SystemExit(f"MISMATCH {key}")
  print(f"round trip bit-identical on all {len(a)} official tensors")


def run(*args):
  print("$ python " + " ".join(args), flush=True)
  subprocess.run([sys.executable, *args], check=True)


def main(argv):
  del argv
  work = pathlib.Path(_WORKDIR.value)
  work.mkdir(parents=True, exist_ok=True)
  original, ours, exported = work / "official", work / "params", work / "export"
  if _STAGE.value == "write":
    return write_random_checkpoint(original, _LAYERS.value, _DTYPE.value)
  if _STAGE.value == "compare":
    return compare(original, exported)
  repo = pathlib.Path(__file__).resolve().parents[3]
  me = ["-m", "mplug2_jax.convert.owl2.large_roundtrip", f"--workdir={work}",
        f"--llm_layers={_LAYERS.value}", f"--dtype={_DTYPE.value}"]
  run(*me, "--stage=write")
  run("-m", "mplug2_jax.convert", "import-official", f"--checkpoint={original}",
      f"--config={CONFIG.format(repo=repo)}", f"--config.model.llm.layers={_LAYERS.value}",
      f"--config.model.param_dtype={_DTYPE.value}", f"--out={ours}")
  run("-m", "mplug2_jax.convert", "export-official", f"--checkpoint={ours}", f"--out={exported}")
  run(*me, "--stage=compare")


if __name__ == "__main__":
  app.run(main)
