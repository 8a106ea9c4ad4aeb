"""Layer stacks: `nn.scan` over identical layers, each wrapped in `nn.remat` with a named
policy (MaxText's presets over `checkpoint_name` tags)."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax

_names = jax.checkpoint_policies.save_only_these_names

# What the backward pass keeps from the forward, ordered from fastest / most memory to
# slowest / leanest. Tags: attentions.py ("query_proj", "key_proj", "value_proj",
# "attention_out", "out_proj") and mlp.py ("mlp_hidden").
REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention": _names("query_proj", "key_proj", "value_proj", "attention_out",
                             "out_proj"),
    "save_qkv_proj": _names("query_proj", "key_proj", "value_proj"),
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything
}


def stack(block: type[nn.Module], length: int, remat_policy: str,
          broadcast_args: int) -> type[nn.Module]:
  """`block` in remat (named policy) and `nn.scan` over `length` layers.

  The block's call signature is `(carry, *broadcast) -> (carry, per_layer_output)`;
  parameters (and "cache" variables) are stacked on a leading "layers" axis.
  """
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy {remat_policy!r} not in {sorted(REMAT_POLICIES)}")
  if remat_policy != "none":
    block = nn.remat(block, policy=REMAT_POLICIES[remat_policy], prevent_cse=False,
                     static_argnums=())
  return nn.scan(
      block,
      variable_axes={"params": 0, "cache": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast,) * broadcast_args,
      length=length,
      metadata_params={nn.PARTITION_NAME: "layers"},
  )


def runs(kinds: Sequence[Any]) -> list[tuple[Any, int, int]]:
  """Groups consecutive equal kinds: ['a','a','b','a'] -> [('a',0,2), ('b',2,1), ('a',3,1)]."""
  out: list[tuple[Any, int, int]] = []
  for i, kind in enumerate(kinds):
    if out and out[-1][0] == kind:
      out[-1] = (kind, out[-1][1], out[-1][2] + 1)
    else:
      out.append((kind, i, 1))
  return out
