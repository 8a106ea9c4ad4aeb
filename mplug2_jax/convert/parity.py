"""Number-for-number parity with the official PyTorch mPLUG-2 on golden case folders.

    python -m mplug2_jax.convert.parity ../shared/golden/mplug2/*

Each case folder (format: `shared/golden/README.md`) holds `config.json` (official config
names), `model.safetensors` (official keys), `inputs.npz`, `outputs.npz`. The model is
built from the config alone, the weights imported with the strict converter, the same
forward passes run in float32 at full matmul precision, and every array of `outputs.npz`
is compared: floats within 1e-4 absolute, integer arrays (ids, lengths, ranks) exactly.
Ends with `parity: N/M arrays within 1e-4, max abs diff X`; exit status 1 on any failure.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mplug2_jax import sharding
from mplug2_jax.convert import official
from mplug2_jax.models import mplug2
from mplug2_jax.train import losses

TOLERANCE = 1e-4
# Diagnostics of the reference generator, not outputs of the model.
DIAGNOSTIC_SUFFIX = "_min_topk_gap"


def load_case(case_dir: pathlib.Path):
  from safetensors.numpy import load_file

  case = json.loads((case_dir / "config.json").read_text())
  model_cfg = official.model_config_from_official(case)
  state = load_file(str(case_dir / "model.safetensors"))
  inputs = dict(np.load(case_dir / "inputs.npz"))
  outputs = dict(np.load(case_dir / "outputs.npz"))
  return case, model_cfg, state, inputs, outputs


def to_batch(task: str, inputs: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Official input layout -> our batch (channels-last video, int32 ids)."""
  batch = {"video": jnp.asarray(inputs["video"].transpose(0, 2, 3, 4, 1))}
  i32 = lambda k: jnp.asarray(inputs[k], jnp.int32)
  if task == "caption":
    batch.update(caption_ids=i32("caption_input_ids"), caption_mask=i32("caption_attention_mask"))
  else:
    batch.update(text_ids=i32("question_input_ids"), text_mask=i32("question_attention_mask"),
                 answer_ids=i32("answer_input_ids"), answer_mask=i32("answer_attention_mask"),
                 answer_question_index=jnp.asarray(np.repeat(
                     np.arange(len(inputs["answers_per_question"])),
                     inputs["answers_per_question"]), jnp.int32))
  return batch


def import_params(model_cfg, state, batch) -> dict:
  """Strict import of the official weights into the model's parameter tree."""
  model = mplug2.build(model_cfg)
  abstract = jax.tree_util.tree_leaves_with_path(
      sharding.unboxed(sharding.abstract_params(model, batch)))
  expected = {"/".join(p.key for p in path): leaf.shape for path, leaf in abstract}
  flat = official.to_flax(state, model_cfg, expected)
  params: dict = {}
  for path, value in flat.items():
    node = params
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(value)
  return params


def run_case(case_dir: pathlib.Path, generate: Callable | None = None) -> dict[str, np.ndarray]:
  """Our arrays, named as in the case's outputs.npz."""
  case, model_cfg, state, inputs, _ = load_case(case_dir)
  task = case["task"]
  batch = to_batch(task, inputs)
  params = import_params(model_cfg, state, batch)
  model = mplug2.build(model_cfg, collect=True)
  out, aux = jax.jit(lambda p, b: model.apply({"params": p}, b))(params, batch)
  ours = {k: np.asarray(v) for k, v in aux.items()}
  ours["vision_block_outputs"] = np.asarray(aux["vision_block_outputs"])
  for j in range(model_cfg.text.universal_layers):
    ours[f"universal_v_layer{j}"] = np.asarray(aux[f"universal_v_layer{j}"])
  ours["decoder_logits"] = np.asarray(out["logits"])
  if task == "caption":
    ours["loss"] = np.asarray(losses.caption_loss(out["logits"], jnp.asarray(inputs["caption_labels"])))
  else:
    labels = jnp.asarray(inputs["answer_labels"])
    ours["answer_loss_per_sequence"] = np.asarray(
        losses.answer_sequence_losses(out["logits"], labels))
    ours["loss"] = np.asarray(losses.answer_loss(out["logits"], labels,
                                                 jnp.asarray(inputs["answer_weights"]),
                                                 len(inputs["answers_per_question"])))
    # The official distillation branch is multiplied by alpha = 0 (spec 6.2).
    ours["loss_with_distill_branch"] = ours["loss"]
  if generate is not None:
    ours.update(generate(case, model_cfg, params, batch, inputs))
  return ours


def compare(expected: dict[str, np.ndarray], ours: dict[str, np.ndarray]):
  """Rows (name, ok, max abs diff or note)."""
  rows = []
  for name, ref in expected.items():
    if name.endswith(DIAGNOSTIC_SUFFIX):
      continue
    if name not in ours:
      rows.append((name, False, float("inf"), "not computed"))
      continue
    got = np.asarray(ours[name])
    if got.shape != ref.shape:
      rows.append((name, False, float("inf"), f"shape {got.shape} != {ref.shape}"))
      continue
    if np.issubdtype(ref.dtype, np.integer):
      diff = float(np.max(np.abs(got.astype(np.int64) - ref))) if ref.size else 0.0
      rows.append((name, diff == 0, diff, "exact"))
    else:
      diff = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
      rows.append((name, diff <= TOLERANCE, diff, ""))
  return rows


def main(argv: list[str]) -> int:
  if not argv:
    print(__doc__)
    return 2
  jax.config.update("jax_default_matmul_precision", "highest")
  try:
    from mplug2_jax.evaluate import generation
    generate = generation.golden_outputs
  except ImportError:
    generate = None
  total = passed = 0
  worst = 0.0
  for case_dir in map(pathlib.Path, argv):
    _, _, _, _, expected = load_case(case_dir)
    rows = compare(expected, run_case(case_dir, generate))
    print(f"== {case_dir}")
    for name, ok, diff, note in rows:
      print(f"  {'ok  ' if ok else 'FAIL'} {name:36s} max abs diff {diff:.3e} {note}")
      total += 1
      passed += ok
      worst = max(worst, diff)
  print(f"parity: {passed}/{total} arrays within {TOLERANCE:g}, max abs diff {worst:.3e}")
  return 0 if passed == total else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
