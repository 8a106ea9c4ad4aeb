"""Roofline model: published accelerator peaks, collective bytes in compiled HLO, and the
step-time / MFU prediction from the per-device figures of an AOT compile (plan.py).

  executed FLOPs = model FLOPs x REMAT_FACTOR[remat]    (full remat re-runs the forward)
  t_compute      = executed FLOPs / (peak x matmul_efficiency)
  t_memory       = (argument + 2 x temporary bytes) / HBM bandwidth      (a lower bound)
  t_collective   = sum over kinds of bytes x ALGORITHM_FACTOR / link bandwidth
  step           = max(t_compute, t_memory) + (1 - overlap) x t_collective
  MFU            = model FLOPs / (step x peak)

`matmul_efficiency` is the share of the dense peak that large bf16 matmuls reach in
practice (an assumption per chip, below), `overlap` the share of collective time hidden
behind compute by XLA's asynchronous collectives (default 0.8, an assumption).

    python -m mplug2_jax.benchmark.roofline /tmp/plan_*.json      # re-predict saved compiles

Kept free of absl flags so that tests and other tools can import it.
"""

from __future__ import annotations

import re

# Published peak numbers (dense bf16 FLOP/s, HBM bytes/s, per-chip interconnect bytes/s
# per direction usable by one collective).
HARDWARE = {
    # 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, 450 GB/s NVLink 4 per direction; cuBLAS bf16
    # GEMMs of these shapes reach ~75 % of the dense peak [assumption].
    "H100 SXM (8-GPU NVLink node)": dict(flops=989e12, hbm=3.35e12, link=450e9,
                                         matmul_efficiency=0.75, hbm_gib=80),
    # 459 TFLOP/s bf16, 2.76 TB/s HBM2e, ICI 4,800 Gbit/s = 600 GB/s per chip over 6 links
    # of a 3D torus; a ring collective drives ~4 of them at once [assumption]; MXU matmuls
    # reach ~85 % of peak [assumption].
    "TPU v5p": dict(flops=459e12, hbm=2.76e12, link=4 * 100e9, matmul_efficiency=0.85,
                    hbm_gib=95),
}
# Executed / model FLOPs per remat policy: "full" recomputes the whole forward (1 of the 3
# forward-equivalents); the dots_* policies keep the matmul outputs and recompute only
# element-wise work, which the analytic count leaves out.
REMAT_FACTOR = {"none": 1.0, "dots_saveable": 1.0, "dots_with_no_batch_dims_saveable": 1.0,
                "full": 4.0 / 3.0}
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


def predict(raw: dict, hardware: str, overlap: float = 0.8) -> dict[str, float]:
  """Step time and MFU on `hardware` from plan.py's per-device figures (`raw`)."""
  hw = HARDWARE[hardware]
  model = raw["model_flops"]
  executed = model * REMAT_FACTOR[raw["remat"]]
  t_compute = executed / (hw["flops"] * hw["matmul_efficiency"])
  t_memory = (raw["argument_bytes"] + 2 * raw["temp_bytes"]) / hw["hbm"]
  t_comm = sum(v * ALGORITHM_FACTOR[k] for k, v in raw["collective_bytes"].items()) / hw["link"]
  step = max(t_compute, t_memory) + (1 - overlap) * t_comm
  gib = (raw["argument_bytes"] + raw["temp_bytes"]) / 2**30
  return dict(t_compute=t_compute, t_memory=t_memory, t_comm=t_comm, step=step,
              mfu=model / (step * hw["flops"]), memory_gib=gib, fits=gib < hw["hbm_gib"])


def format_prediction(hardware: str, p: dict[str, float]) -> str:
  return (f"{hardware}: compute {p['t_compute'] * 1e3:.0f} ms, memory {p['t_memory'] * 1e3:.0f} "
          f"ms, collectives {p['t_comm'] * 1e3:.0f} ms -> step {p['step'] * 1e3:.0f} ms, MFU "
          f"{100 * p['mfu']:.0f}%; {p['memory_gib']:.1f} GiB per device "
          f"({'fits' if p['fits'] else 'does NOT fit'} in {HARDWARE[hardware]['hbm_gib']} GiB)")


def main(paths: list[str]) -> None:
  import json

  for path in paths:
    with open(path) as f:
      raw = json.load(f)
    print(f"{path}: {raw['devices']} devices, mesh {tuple(raw['mesh'])}, "
          f"{raw['per_device_batch']}/device, remat {raw['remat']}, attention {raw['attention']}")
    for name in HARDWARE:
      print("  " + format_prediction(name, predict(raw, name)))


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
