"""mPLUG-2 golden cases: build the model from the case's official config, import its
weights with the strict converter, and compute every array of its `outputs.npz`.

A case folder (format: the golden data README) holds `config.json` (official config names:
the task YAML under "config", the BERT json under "bert_config", the CLIP architecture
under "clip_arch"), `model.safetensors` (official keys), `inputs.npz`, `outputs.npz`. The
generic driver (`convert/parity.py`) compares.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from mplug2_jax import sharding
from mplug2_jax.convert.mplug2 import official
from mplug2_jax.models.mplug2 import generation, model as model_lib, objectives


def recognises(case: dict) -> bool:
  """An mPLUG-2 case: the official YAML, BERT and CLIP sections."""
  return {"config", "bert_config", "clip_arch"} <= set(case)


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
  model = model_lib.build(model_cfg)
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


def run_case(case_dir: pathlib.Path, generate: bool = True) -> dict[str, np.ndarray]:
  """Our arrays, named as in the case's outputs.npz."""
  case, model_cfg, state, inputs, _ = load_case(case_dir)
  task = case["task"]
  batch = to_batch(task, inputs)
  params = import_params(model_cfg, state, batch)
  model = model_lib.build(model_cfg, collect=True)
  out, aux = jax.jit(lambda p, b: model.apply({"params": p}, b))(params, batch)
  ours = {k: np.asarray(v) for k, v in aux.items()}
  ours["vision_block_outputs"] = np.asarray(aux["vision_block_outputs"])
  for j in range(model_cfg.text.universal_layers):
    ours[f"universal_v_layer{j}"] = np.asarray(aux[f"universal_v_layer{j}"])
  ours["decoder_logits"] = np.asarray(out["logits"])
  if task == "caption":
    ours["loss"] = np.asarray(objectives.caption_loss(out["logits"], jnp.asarray(inputs["caption_labels"])))
  else:
    labels = jnp.asarray(inputs["answer_labels"])
    ours["answer_loss_per_sequence"] = np.asarray(
        objectives.answer_sequence_losses(out["logits"], labels))
    ours["loss"] = np.asarray(objectives.answer_loss(out["logits"], labels,
                                                 jnp.asarray(inputs["answer_weights"]),
                                                 len(inputs["answers_per_question"])))
    # The official distillation branch is multiplied by alpha = 0 (spec 6.2).
    ours["loss_with_distill_branch"] = ours["loss"]
  if generate:
    ours.update(golden_outputs(case, model_cfg, params, batch, inputs))
  return ours


def golden_outputs(case: dict, model_cfg, params, batch, inputs) -> dict[str, np.ndarray]:
  """Generation / ranking arrays named as in the golden outputs.npz (parity CLI)."""

  model = model_lib.build(model_cfg)
  apply = lambda method, *a: model.apply({"params": params}, *a, method=method)

  def decode_fn(ids, mask, states, states_mask):
    return apply(model_lib.Mplug2.decode, ids, mask, states, states_mask)[0]

  image, _ = apply(model_lib.Mplug2.embed_image, batch["video"])
  image_mask = jnp.ones(image.shape[:2], jnp.int32)
  if case["task"] == "caption":
    states, states_mask = image, image_mask
  else:
    question, _ = apply(model_lib.Mplug2.embed_text, batch["text_ids"], batch["text_mask"])
    fused_image, fused_text = apply(model_lib.Mplug2.fuse, image, image_mask, question,
                                    batch["text_mask"])
    states, states_mask = model_lib.answer_encoder_states(fused_image, image_mask, fused_text,
                                                       batch["text_mask"], None)
  gen = case["generation"]
  out = {}
  for name, beams in (("beam", gen["beam_size"]), ("greedy", 1)):
    search = jax.jit(lambda s, m, beams=beams: generation.beam_search(
        decode_fn, s, m, beam_size=beams, min_length=gen["min_length"],
        max_length=gen["max_length"]))
    result = search(states, states_mask)
    out[f"generate_{name}_ids"] = np.asarray(result.ids)
    out[f"generate_{name}_lengths"] = np.asarray(result.lengths)
    out[f"generate_{name}_scores"] = np.asarray(result.scores)
  if case["task"] != "caption":
    ids, probs = jax.jit(generation.rank_answers, static_argnums=(0, 5, 6))(
        decode_fn, states, states_mask, jnp.asarray(inputs["answer_list_input_ids"], jnp.int32),
        jnp.asarray(inputs["answer_list_attention_mask"], jnp.int32), int(inputs["rank_k"]), True)
    out["rank_topk_ids"], out["rank_topk_probs"] = np.asarray(ids), np.asarray(probs)
  return out


def run(case_dir: pathlib.Path):
  """(expected outputs, our outputs, comparison masks) of one case (`convert/parity.py`)."""
  _, _, _, _, expected = load_case(case_dir)
  return expected, run_case(case_dir), None
