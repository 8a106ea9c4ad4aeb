"""Input-pipeline throughput: clips per second per CPU core.

  python -m mplug2_jax.data.benchmark [--clips 24 --seconds 4 --frames 16 --size 224
                                       --workers 2 --batch 8]

Synthesises ~360p (640x360, 30 fps) H.264 clips, builds them into a video-caption dataset,
then measures
  1. per core: the per-example work (decode 16 frames + train augment + tokenise) and
     collation in this process, one core: clips per wall-clock second, clips per CPU second
     of this process (the same on an idle machine; the CPU figure barely moves when other
     jobs share the core), and CPU ms per clip by stage;
  2. end to end: the Grain loader with `--workers` worker processes (mp_prefetch), reported
     as clips/s and clips/s per worker.
Target (issue 5): >= 8 clips/s/core at 16 frames, 224 px.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from typing import Sequence

import numpy as np
from absl import flags

from mplug2_jax import cli


def make_clips(root: str, n: int, seconds: float, width: int = 640, height: int = 360,
               fps: int = 30) -> str:
  """n moving-shape clips at the given resolution; returns the annotation file."""
  sizes = []
  from mplug2_jax.data import demo

  os.makedirs(os.path.join(root, "videos"), exist_ok=True)
  rng = np.random.default_rng(0)
  frames = int(seconds * fps)
  rows = []
  # A smooth random texture panned 2 px per frame plus a moving shape: realistic motion
  # for the encoder, so that decoding costs what camera footage of this size costs.
  # 2-px texture blocks give ~400 kbit/s at crf 23, typical of 360p web video.
  noise = rng.integers(0, 256, (height // 2 + 1, (width + 2 * frames) // 2 + 1, 3), np.uint8)
  texture = np.repeat(np.repeat(noise, 2, axis=0), 2, axis=1)[:height]
  for i in range(n):
    colour, shape, direction = demo._attributes(rng)  # pylint: disable=protected-access
    shape_clip = demo.render_clip(rng, colour, shape, direction, 128, frames)
    clip = np.stack([texture[:, 2 * t:2 * t + width] for t in range(frames)])
    clip[:, 100:228, 200:328] = shape_clip
    name = f"bench_{i:04d}"
    data = demo.encode_mp4(clip, fps=fps, crf=23, deterministic=False)
    sizes.append(len(data))
    with open(os.path.join(root, "videos", name + ".mp4"), "wb") as f:
      f.write(data)
    rows.append({"video_id": name, "caption": f"a {colour} {shape} moves {direction}"})
  print(f"{n} clips {width}x{height} {fps} fps {seconds:g} s, "
        f"mean {np.mean(sizes) * 8 / seconds / 1000:.0f} kbit/s")
  path = os.path.join(root, "train.jsonl")
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return path


# Stages timed by wrapping the media functions the preprocessor calls (module attributes, so
# calls from inside media.train_transform are timed too); the rest of the per-clip CPU time
# is "other": the crop box and flip draws, the uint8 cast, tokenising and collation.
STAGES = {"decode": "decode", "resize": "resize_bicubic_trunc",
          "randaug": "temporal_random_augment", "normalize": "normalize"}


@contextlib.contextmanager
def _stage_timers(totals: dict[str, float]):
  from mplug2_jax.data import media

  def timed(stage, fn):
    def wrapper(*args, **kwargs):
      start = time.process_time()
      try:
        return fn(*args, **kwargs)
      finally:
        totals[stage] += time.process_time() - start
    return wrapper

  originals = {name: getattr(media, name) for name in STAGES.values()}
  try:
    for stage, name in STAGES.items():
      setattr(media, name, timed(stage, originals[name]))
    yield totals
  finally:
    for name, fn in originals.items():
      setattr(media, name, fn)


def run(clips: int = 24, seconds: float = 4.0, frames: int = 16, size: int = 224,
        workers: int = 2, batch: int = 8, vocab_file: str = "bert-base-uncased",
        randaug: bool = True) -> dict[str, float]:
  import ml_collections

  from mplug2_jax.data import build, default_data_config, pipeline, records

  with tempfile.TemporaryDirectory() as tmp:
    ann = make_clips(tmp, clips, seconds)
    out = build.build("video_caption", os.path.join(tmp, "ds"), {"train": [ann]},
                      os.path.join(tmp, "videos"), log=lambda *_: None)
    d = default_data_config()
    d.vocab_file = vocab_file
    d.mixture = ((out, 1.0),)
    d.num_frames, d.image_size, d.randaug = frames, size, randaug
    model = ml_collections.ConfigDict({"task": "caption", "num_frames": frames,
                                       "image_size": size})

    # 1. One core: preprocessing + collation in this process.
    source = records.RecordSource(out, "train")
    fn = pipeline.Preprocessor(d, "caption", True, frames, size, pipeline.make_tokenizer(d))
    collate = pipeline.Collate(0)
    recs = [source[i] for i in range(len(source))]
    fn(recs[0], np.random.default_rng(0))  # warm-up (imports, codec init)
    stages = dict.fromkeys(STAGES, 0.0)
    with _stage_timers(stages):
      start, cpu_start = time.perf_counter(), time.process_time()
      n = 0
      for rep in range(2):
        examples = []
        for i, r in enumerate(recs):
          examples.append(fn(r, np.random.default_rng([rep, i])))
          if len(examples) == batch:
            collate(examples)
            examples = []
          n += 1
      per_core = n / (time.perf_counter() - start)
      cpu = time.process_time() - cpu_start
    stage_ms = {k: 1000 * v / n for k, v in stages.items()}
    stage_ms["other"] = 1000 * cpu / n - sum(stage_ms.values())

    # 2. End to end with worker processes.
    d.num_workers = workers
    it = pipeline.make_iterator(d, split="train", batch_size=batch, model_cfg=model,
                                process_index=0, process_count=1, seed=0)
    # Worker start-up is excluded. The workers' buffers may be full when the clock starts
    # (the consumer is faster than the workers), so those batches are not counted as made in
    # the window: a lower bound on the steady-state rate.
    buffered = workers * d.per_worker_buffer_size
    for _ in range(1 + 2 * buffered):
      next(it)
    steps = max(16, 6 * clips // batch) + buffered
    start = time.perf_counter()
    for _ in range(steps):
      next(it)
    loader = (steps - buffered) * batch / (time.perf_counter() - start)
    it.close()
  return {"clips_per_s_per_core": per_core, "clips_per_cpu_s": n / cpu,
          "loader_clips_per_s": loader, "loader_clips_per_s_per_worker": loader / max(1, workers),
          **{f"cpu_ms_{k}": v for k, v in stage_ms.items()}}


def main(argv: Sequence[str] | None = None) -> None:
  fv = flags.FlagValues()
  flags.DEFINE_integer("clips", 24, "Synthetic clips to write and read.", flag_values=fv)
  flags.DEFINE_float("seconds", 4.0, "Clip length.", flag_values=fv)
  flags.DEFINE_integer("frames", 16, "Frames decoded per clip.", flag_values=fv)
  flags.DEFINE_integer("size", 224, "Training resolution.", flag_values=fv)
  flags.DEFINE_integer("workers", 2, "Grain worker processes of the loader run.",
                       flag_values=fv)
  flags.DEFINE_integer("batch", 8, "Batch size.", flag_values=fv)
  flags.DEFINE_string("vocab_file", "bert-base-uncased", "BERT vocab.txt (or the alias).",
                      flag_values=fv)
  flags.DEFINE_bool("randaug", True, "RandAugment (--norandaug: off).", flag_values=fv)
  cli.parse(fv, [("--norandaug" if x == "--no_randaug" else x) for x in (argv or sys.argv[1:])],
            __doc__)
  a = fv
  r = run(a.clips, a.seconds, a.frames, a.size, a.workers, a.batch, a.vocab_file, a.randaug)
  print(f"per core (decode {a.frames}f@640x360 + augment to {a.size} + tokenise + collate): "
        f"{r['clips_per_s_per_core']:.2f} clips/s/core, "
        f"{r['clips_per_cpu_s']:.2f} clips per CPU second")
  print("CPU ms per clip: " + ", ".join(f"{k} {r['cpu_ms_' + k]:.1f}"
                                        for k in (*STAGES, "other")))
  print(f"loader, {a.workers} workers: {r['loader_clips_per_s']:.2f} clips/s "
        f"({r['loader_clips_per_s_per_worker']:.2f} per worker)")


if __name__ == "__main__":
  main()
