r"""Large-config conversion both ways, with peak host memory (random official weights).

    python -m mplug2_jax.convert.mplug2.large_roundtrip --workdir /tmp/large_rt [--task caption]

1. writes a random checkpoint with every key of the official large task model
   (`layout.official_layout`, 1.52B unique parameters for caption), in its own process;
2. `import-official` into an orbax checkpoint, in a fresh process (peak RSS printed);
3. `export-official --reference` back to safetensors, in a fresh process;
4. checks that every tensor of the export equals the original, bit for bit.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/mplug2_large_roundtrip", "Scratch directory.")
_TASK = flags.DEFINE_enum("task", "caption", ["caption", "videoqa"], "Official task model.")
_STAGE = flags.DEFINE_string("stage", None, "internal: run one stage in this process.")

CONFIG = "{repo}/configs/{task}.py:large"


def write_random_checkpoint(path: pathlib.Path, task: str) -> None:
  import numpy as np
  from safetensors.numpy import save_file

  from mplug2_jax.convert.mplug2 import layout
  from mplug2_jax.models.mplug2 import config as mplug2_config

  m = mplug2_config.model_config("large", task)
  m.official.distill = False
  rng = np.random.default_rng(0)
  state = {}
  for key, (shape, dtype) in layout.official_layout(m).items():
    if dtype == "int64":
      state[key] = np.arange(shape[-1], dtype=np.int64).reshape(shape)
    else:
      state[key] = np.asarray(rng.standard_normal(shape, dtype=np.float32) * 0.02)
  tied = {"text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
          "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias"}
  for a, b in tied.items():
    state[a] = state[b]
  save_file(state, str(path))
  print(f"wrote {sum(v.size for k, v in state.items() if k not in tied and v.dtype != np.int64):,} unique parameters "
        f"({path.stat().st_size / 2**30:.2f} GiB) to {path}")


def compare(original: pathlib.Path, exported: pathlib.Path) -> None:
  import numpy as np

  from mplug2_jax.convert import checkpoints

  a, b = checkpoints.LazyStateDict(original), checkpoints.LazyStateDict(exported)
  assert set(a) == set(b), (set(a) ^ set(b))
  for key in a:
    if not np.array_equal(a[key], b[key]):
      raise SystemExit(f"MISMATCH {key}")
  print(f"round trip bit-identical on all {len(a)} official tensors")


def run(*args):
  print("$ " + " ".join(args), flush=True)
  subprocess.run([sys.executable, *args], check=True)


def main(argv):
  del argv
  work = pathlib.Path(_WORKDIR.value)
  work.mkdir(parents=True, exist_ok=True)
  original, ours, exported = work / "official.safetensors", work / "orbax", work / "export.safetensors"
  if _STAGE.value == "write":
    return write_random_checkpoint(original, _TASK.value)
  if _STAGE.value == "compare":
    return compare(original, exported)
  repo = pathlib.Path(__file__).resolve().parents[3]
  me = ["-m", "mplug2_jax.convert.mplug2.large_roundtrip", f"--workdir={work}", f"--task={_TASK.value}"]
  run(*me, "--stage=write")
  run("-m", "mplug2_jax.convert", "import-official", f"--checkpoint={original}",
      f"--config={CONFIG.format(repo=repo, task=_TASK.value)}",
      "--config.model.official.distill=False", f"--out={ours}")
  run("-m", "mplug2_jax.convert", "export-official", f"--checkpoint={ours}", f"--out={exported}",
      f"--reference={original}")
  run(*me, "--stage=compare")


if __name__ == "__main__":
  app.run(main)
