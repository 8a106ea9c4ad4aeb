"""Building blocks shared by every model family (mPLUG-2, mPLUG-Owl2).

One module per kind, lowest first:

  axes.py          logical axis names of parameters and activations, `constrain`
  linear.py        `Dense` (contracts the last dims; kernel axes named), initialisers
  norms.py         `Norm`: LayerNorm or RMSNorm, float32 statistics
  activations.py   the activation table (erf GELU, QuickGELU, SiLU, ...)
  embeddings.py    rotary position embeddings, fixed sin-cos tables
  attention_op.py  the attention computation: xla | cudnn | explicit | chunked | auto,
                   grouped-query heads, boolean masks
  attentions.py    `MultiHeadAttention`: projections around the op, with RoPE,
                   per-modality key/value projections and a key/value cache
  multiway.py      per-modality copies of a module, selected per token
  mlp.py           `Mlp`: plain or gated, optional bias and inner norm
  stack.py         scan over layers with a named remat policy
  losses.py        token cross-entropies with the official reductions

Model files import what they use from here; nothing here knows a model family.
"""
