"""mPLUG-Owl2 golden cases: build the model from the case's official `config.json`, import
its weights with the strict converter, and compute every array of its `outputs.npz`.

Format: `shared/golden/owl2_README.md`. Model cases give `input_ids` (with -200
placeholders), masks, labels, `pixel_values` (N, 3, S, S) and which sample consumes each
image (`image_to_sample`, `image_used`: 0 = a dummy image a text-only sample consumes
officially); we put each used image in its sample's next slot (`models/owl2/schema.py`).
Per-image arrays (ViT, abstractor) are computed for all N images. Arrays over the spliced
sequence are compared where the golden `expanded_attention_mask` is 1, and their length
L' is the longest spliced sample. The golden generation is per sample, unpadded; ours
runs the whole padded batch at once (`models/owl2/generation.py`) and must agree.

`preprocess_*` cases hold one uint8 image and the official `process_images` output.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from mplug2_jax import param_store, sharding
from mplug2_jax.convert import checkpoints
from mplug2_jax.convert.owl2 import official
from mplug2_jax.models.owl2 import generation, model as model_lib, objectives
from mplug2_jax.models.owl2 import config as owl2_config
from mplug2_jax.tokens import IMAGE_TOKEN_INDEX

# Arrays over the spliced sequence: compared where expanded_attention_mask == 1.
EXPANDED = ("inputs_embeds", "modality_indicators", "expanded_labels", "llm_hidden_states",
            "llm_last_layer_output", "logits")


def recognises(case: dict) -> bool:
  """An Owl2 model case (official MPLUGOwl2Config) or an Owl2 preprocessing case."""
  return case.get("model_type") == "mplug_owl2" or (
      "image_processor" in case and "image_aspect_ratio" in case)


def load_case(case_dir: pathlib.Path):
  case = json.loads((case_dir / "config.json").read_text())
  inputs = dict(np.load(case_dir / "inputs.npz"))
  outputs = dict(np.load(case_dir / "outputs.npz"))
  return case, inputs, outputs


def to_batch(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Golden inputs -> our batch: int32 ids, channels-last images in per-sample slots."""
  batch = {k: np.asarray(inputs[k], np.int32) for k in ("input_ids", "attention_mask", "labels")}
  if "pixel_values" not in inputs:
    return batch
  pixels = np.asarray(inputs["pixel_values"], np.float32).transpose(0, 2, 3, 1)
  owner = np.asarray(inputs["image_to_sample"])
  used = np.asarray(inputs.get("image_used", np.ones_like(owner))).astype(bool)
  rows = batch["input_ids"].shape[0]
  per_sample = [np.flatnonzero((owner == b) & used) for b in range(rows)]
  slots = max(1, max(len(p) for p in per_sample))
  images = np.zeros((rows, slots) + pixels.shape[1:], np.float32)
  image_mask = np.zeros((rows, slots), np.int32)
  for b, indices in enumerate(per_sample):
    images[b, :len(indices)] = pixels[indices]
    image_mask[b, :len(indices)] = 1
  batch.update(images=images, image_mask=image_mask)
  return batch


def expanded_length(model_cfg, input_ids: np.ndarray) -> int:
  """L': the longest sample after splicing (its padding tokens included), as officially."""
  per_image = owl2_config.tokens_per_image(model_cfg)
  return int(np.max(input_ids.shape[1] + (per_image - 1) * (input_ids == IMAGE_TOKEN_INDEX).sum(1)))


def import_params(model_cfg, state) -> dict:
  """Strict import of the official weights into the model's parameter tree."""
  from mplug2_jax.models import owl2

  model = model_lib.build(model_cfg)
  expected = {k: v.shape for k, v in sharding.flat(sharding.unboxed(
      sharding.abstract_params(model, owl2.init_batch(model_cfg)))).items()}
  flat = official.to_flax(state, model_cfg, expected, dtype=np.float32)
  return jax.tree.map(jnp.asarray, param_store.nest(flat))


def run_case(case_dir: pathlib.Path) -> dict[str, np.ndarray]:
  """Our arrays of a model case, named as in its outputs.npz."""
  case, inputs, expected = load_case(case_dir)
  model_cfg = official.model_config_from_official(case)
  owl2_config.validate(model_cfg)
  batch = to_batch(inputs)
  state = checkpoints.open_state_dict(case_dir / "model.safetensors")
  params = import_params(model_cfg, state)
  ours: dict[str, np.ndarray] = {}

  model = model_lib.build(model_cfg, collect=True)
  if "pixel_values" in inputs:
    pixels = jnp.asarray(np.asarray(inputs["pixel_values"], np.float32).transpose(0, 2, 3, 1))
    _, aux = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                              method=model_lib.Owl2.encode_images))(params, pixels)
    ours["vision_hidden_states"] = np.concatenate(
        [np.asarray(aux["vision_embeddings"])[None], np.asarray(aux["vision_block_outputs"])])
    for name in ("vision_last_hidden_state", "abstractor_layer_outputs", "abstractor_output"):
      ours[name] = np.asarray(aux[name])

  out, aux = jax.jit(lambda p, b: model.apply({"params": p}, b))(
      params, {k: jnp.asarray(v) for k, v in batch.items()})
  length = expanded_length(model_cfg, batch["input_ids"])
  cut = lambda x: np.asarray(x)[:, :length]
  layers = np.asarray(aux["llm_layer_outputs"])[:, :, :length]
  ours.update(
      inputs_embeds=cut(aux["inputs_embeds"]), modality_indicators=cut(aux["modality_indicators"]),
      expanded_attention_mask=cut(aux["expanded_attention_mask"]),
      expanded_labels=cut(aux["expanded_labels"]), logits=cut(out["logits"]),
      llm_last_layer_output=layers[-1],
      llm_hidden_states=np.concatenate([cut(aux["inputs_embeds"])[None], layers[:-1],
                                        cut(aux["llm_final_states"])[None]]),
      loss=np.asarray(objectives.lm_loss(out["logits"], out["labels"])))

  if "gen_tokens" in expected:
    steps = int(case.get("_golden_case", {}).get("num_new_tokens", expected["gen_tokens"].shape[1]))
    cached = model_lib.build(model_cfg, use_cache=True)
    run = jax.jit(lambda p, b: generation.generate(
        cached, p, b["input_ids"], b["attention_mask"], b.get("images"), b.get("image_mask"),
        max_new_tokens=steps, return_logits=True, pad_id=model_cfg.llm.pad_token_id))
    result = run(params, {k: jnp.asarray(v) for k, v in batch.items()})
    ours["gen_tokens"] = np.asarray(result.tokens)
    ours["gen_logits"] = np.asarray(result.logits)
  return ours


def run_preprocess(case: dict, inputs: dict) -> dict[str, np.ndarray]:
  from mplug2_jax.data import instruction

  processor = case["image_processor"]
  size = int(processor.get("crop_size", processor.get("size")))
  if int(processor.get("size", size)) != size or int(processor.get("resample", 3)) != 3:
    raise ValueError(f"preprocessing case: size {processor.get('size')} / crop "
                     f"{processor.get('crop_size')} / resample {processor.get('resample')} "
                     "differ from the official CLIP processor (bicubic, crop = size)")
  for key, ours in (("image_mean", instruction.media.CLIP_MEAN),
                    ("image_std", instruction.media.CLIP_STD)):
    if not np.allclose(processor.get(key, ours), ours):
      raise ValueError(f"preprocessing case: {key} {processor[key]} is not CLIP's {ours}")
  if tuple(case.get("pad_background_rgb", instruction.PAD_RGB)) != tuple(instruction.PAD_RGB):
    raise ValueError(f"preprocessing case: pad colour {case['pad_background_rgb']} is not "
                     f"{instruction.PAD_RGB}")
  pixels = instruction.image_pixels(inputs["image_uint8"], size,
                                    aspect=case["image_aspect_ratio"])
  return {"pixel_values": pixels.transpose(2, 0, 1)[None]}


def run(case_dir: pathlib.Path):
  """(expected outputs, our outputs, comparison masks) of one case (`convert/parity.py`)."""
  case, inputs, expected = load_case(case_dir)
  if "image_processor" in case:
    return expected, run_preprocess(case, inputs), None
  ours = run_case(case_dir)
  mask = np.asarray(expected["expanded_attention_mask"]).astype(bool)
  where = {}
  for name in EXPANDED:
    if name in expected:
      lead = expected[name].shape[:expected[name].ndim - (mask.ndim if name in (
          "modality_indicators", "expanded_labels") else mask.ndim + 1)]
      where[name] = np.broadcast_to(mask, lead + mask.shape)
  return expected, ours, where
