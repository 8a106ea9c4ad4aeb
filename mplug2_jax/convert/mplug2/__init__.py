"""mPLUG-2 conversion: official PyTorch checkpoints <-> our parameter tree.

  official.py         the key/layout table (both directions), strict accounting
  layout.py           the complete official state-dict layout of a task model
  pretrained.py       pretraining init from CLIP (OpenAI / HF) and BERT (HF) weights
  parity.py           golden cases: config.json -> model, weights, every output array
  large_roundtrip.py  the large model both ways with peak host memory

The generic CLI (`python -m mplug2_jax.convert`) calls the functions below.
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections
import numpy as np

from mplug2_jax.convert.mplug2 import official, pretrained
from mplug2_jax.convert.mplug2.official import ConversionError

INIT_SOURCES = ("clip", "bert")  # init-pretrained --clip / --bert

# The tasks with an official PyTorch model (spec sections 2-5). The video classification
# head (`classification`: vision tower + linear classifier) has no released official
# model or state-dict layout, so it is neither imported nor exported.
OFFICIAL_TASKS = ("caption", "videoqa", "grounding", "retrieval", "pretrain")


def _check_task(m: ml_collections.ConfigDict, what: str) -> None:
  if m.task not in OFFICIAL_TASKS:
    raise ConversionError(f"{what}: the {m.task!r} task has no official PyTorch model (no "
                          f"released code or state-dict layout to match); tasks that "
                          f"convert: {', '.join(OFFICIAL_TASKS)}")


def import_official(state: Mapping, m: ml_collections.ConfigDict,
                    expected: dict[str, tuple]) -> tuple[dict[str, np.ndarray], list[str]]:
  """(flat params, notes) from an official state dict, every key accounted for."""
  _check_task(m, "import-official")
  notes = []
  if official.is_pretraining_layout(state):
    state = official.PretrainingStateDict(state)
    modules = sorted({k.split(".")[0] for k in state.left_out})
    notes.append(f"official pretraining checkpoint: keys renamed as the official fine-tuning "
                 f"scripts do; left out {len(state.left_out)} keys of modules no task model "
                 f"has ({', '.join(modules) or 'none'})")
  adapted = official.AdaptedStateDict(state, m)
  flat = official.to_flax(adapted, m, expected)
  if adapted.resized_from is not None:
    notes.append(f"visual positional embedding resized {adapted.resized_from} -> grid "
                 f"{m.image_size // m.vision.patch_size}")
  return flat, notes


def export_official(flat: dict[str, np.ndarray], m: ml_collections.ConfigDict,
                    reference: Mapping | None) -> tuple[dict[str, np.ndarray], list[str]]:
  """(official state dict, notes): every key of the official task model."""
  _check_task(m, "export-official")
  state, counts = official.export_state(flat, m, reference)
  notes = [f"sources: {counts}"]
  if counts["zeros"]:
    notes.append(f"{counts['zeros']} tensors the official model builds but never runs were "
                 "written as zeros (pass --reference to copy them from an official checkpoint)")
  return state, notes


def init_pretrained(fresh: dict[str, np.ndarray], m: ml_collections.ConfigDict,
                    sources: dict[str, Mapping | None], positional_embedding: str = "resized"
                    ) -> tuple[dict[str, np.ndarray], list[str]]:
  """(flat params, notes): fresh parameters with CLIP and/or BERT weights imported."""
  params, report = pretrained.initialise(fresh, m, clip=sources.get("clip"),
                                         bert=sources.get("bert"),
                                         positional_embedding=positional_embedding)
  return params, [f"imported {len(report['imported'])} pretrained tensors",
                  "fresh (official initialisers): " + ", ".join(
                      pretrained.summarise(report["fresh"]))]


__all__ = ["ConversionError", "INIT_SOURCES", "import_official", "export_official",
           "init_pretrained"]
