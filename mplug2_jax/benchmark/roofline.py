"""Roofline inputs: published accelerator peaks and collective bytes in compiled HLO.

Kept free of absl flags so that tests and other tools can import it.
"""

from __future__ import annotations

import re

# Published peak numbers (dense bf16 FLOP/s, HBM bytes/s, per-chip interconnect bytes/s
# per direction usable by one collective).
HARDWARE = {
    "8xH100 (SXM, NVLink)": dict(flops=989e12, hbm=3.35e12, link=450e9),
    "TPU v5p": dict(flops=459e12, hbm=2.76e12, link=4 * 100e9),  # 6 ICI links x 100 GB/s; a
                                                                 # ring uses ~4 at once
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1,
               "s64": 8, "u64": 8, "f64": 8}
# Bytes a ring moves per device relative to the buffer size: all-reduce 2(n-1)/n,
# all-gather / reduce-scatter (n-1)/n of the full buffer; ~1 used for large n.
ALGORITHM_FACTOR = {"all-reduce": 2.0, "all-gather": 1.0, "reduce-scatter": 1.0,
                    "all-to-all": 1.0, "collective-permute": 1.0}


def collective_bytes(hlo: str) -> dict[str, float]:
  """Bytes of the result buffers of each collective kind in an HLO module."""
  out = {kind: 0.0 for kind in COLLECTIVES}
  pattern = re.compile(r"=\s*(\(?[a-z0-9\[\],{}\s:/_.]*?\)?)\s+(" + "|".join(COLLECTIVES) +
                       r")(-start)?\(")
  for line in hlo.splitlines():
    match = pattern.search(line)
    if not match:
      continue
    kind = match.group(2)
    for dtype, dims in re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", match.group(1)):
      if dtype not in DTYPE_BYTES:
        continue
      size = 1
      for d in filter(None, dims.split(",")):
        size *= int(d)
      out[kind] += size * DTYPE_BYTES[dtype]
  return out
