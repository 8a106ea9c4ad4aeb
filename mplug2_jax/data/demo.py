"""Embedded demo dataset: coloured shapes moving in four directions, as real mp4/jpeg bytes.

  python -m mplug2_jax.data.demo --out DIR [--train 192 --test 48 --size 64 --frames 16]

Deterministic (fixed seed, single-threaded x264) and download-free. Each clip shows one
shape (circle / square / triangle) of one colour (red / green / blue / yellow) moving
left / right / up / down over a dark background with a distractor-free scene, so that
captions and answers about motion need the temporal order of the frames. Written:

  DIR/raw/videos/demo_{split}_{i:05d}.mp4   DIR/raw/images/demo_{split}_{i:05d}.jpg
  DIR/raw/video_{caption,qa,retrieval}_{split}.jsonl   DIR/raw/image_text_{split}.json
  DIR/raw/video_classification_{split}.csv   (Kinetics layout; label = the direction)
  DIR/{video_caption,video_qa,video_retrieval,image_text,video_classification}/
                                               built with `build.build`

Caption records use the official layouts (train: one caption per line; test:
`golden_captions`), QA lines carry three questions per clip (colour, shape, direction).
"""

from __future__ import annotations

import io
import json
import os
import time
from typing import Sequence

import numpy as np
from absl import flags

from mplug2_jax import cli

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230),
           "yellow": (230, 220, 40)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
DIRECTION_WORDS = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
CAPTION_TEMPLATES = ("a {c} {s} moves {d}", "a {c} {s} is moving {d}",
                     "the {c} {s} slides {d}")
IMAGE_TEMPLATES = ("a {c} {s}", "a picture of a {c} {s}", "a {c} {s} on a dark background")


# --------------------------------------------------------------------------------------
# Encoding helpers (also used by tests and the benchmark).
# --------------------------------------------------------------------------------------


def encode_mp4(frames: np.ndarray, fps: int = 8, crf: int = 18,
               deterministic: bool = True) -> bytes:
  """uint8 (T, H, W, 3) -> H.264 mp4 bytes (yuv420p; H and W must be even).

  `deterministic`: x264 without its assembly kernels, which were seen to give different
  bytes from run to run on small frames (they read uninitialised memory); slower.
  """
  import av

  buf = io.BytesIO()
  with av.open(buf, mode="w", format="mp4") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    # One thread, so that the output does not depend on thread scheduling.
    options = {"crf": str(crf), "preset": "veryfast", "threads": "1"}
    if deterministic:
      options["x264-params"] = "asm=0"
    stream.options = options
    stream.codec_context.thread_count = 1
    for t, f in enumerate(frames):
      # RGB -> YUV in numpy: exact and independent of swscale's CPU-specific paths.
      frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(f), format="yuv420p")
      frame.pts = t
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return buf.getvalue()


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
  """uint8 (H, W, 3) -> planar I420 (H * 3 / 2, W), BT.601 limited range (swscale default)."""
  x = rgb.astype(np.float32)
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
  cb = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
  cr = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
  h, w = rgb.shape[:2]
  sub = lambda c: c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)).reshape(h // 4, w)
  planes = [y, sub(cb), sub(cr)]
  return np.concatenate([np.clip(np.round(p), 0, 255).astype(np.uint8) for p in planes])


def encode_jpeg(image: np.ndarray, quality: int = 92) -> bytes:
  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


# --------------------------------------------------------------------------------------
# Rendering.
# --------------------------------------------------------------------------------------


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
  y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  if shape == "circle":
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
  if shape == "square":
    return (np.abs(x - cx) <= r * 0.85) & (np.abs(y - cy) <= r * 0.85)
  # Upward triangle: inside the band below the apex and within the widening sides.
  top, bottom = cy - r, cy + r
  half_width = (y - top) / (2 * r) * r
  return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)


def render_clip(rng: np.random.Generator, colour: str, shape: str, direction: str,
                size: int, frames: int) -> np.ndarray:
  """uint8 (frames, size, size, 3): the shape crosses most of the frame in `direction`."""
  r = size * rng.uniform(0.2, 0.28)   # large enough to see at the 32 px the demo trains at
  dx, dy = DIRECTIONS[direction]
  travel = size - 2 * r - 4
  # Start on the side the motion comes from; random position on the other axis.
  start = np.array([size / 2, size / 2], np.float32)
  other = rng.uniform(r + 2, size - r - 2)
  if dx:
    start = np.array([size / 2 - dx * travel / 2, other])
  else:
    start = np.array([other, size / 2 - dy * travel / 2])
  background = rng.integers(10, 60, size=3)
  rgb = np.array(COLOURS[colour])
  out = np.empty((frames, size, size, 3), np.uint8)
  for t in range(frames):
    frac = t / max(1, frames - 1)
    cx, cy = start[0] + dx * travel * frac, start[1] + dy * travel * frac
    img = np.broadcast_to(background, (size, size, 3)).astype(np.uint8).copy()
    img[_shape_mask(shape, size, cx, cy, r)] = rgb
    out[t] = img
  return out


def _attributes(rng: np.random.Generator):
  return (list(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))],
          list(DIRECTIONS)[rng.integers(len(DIRECTIONS))])


def write_raw(out: str, num_train: int = 192, num_test: int = 48, size: int = 64,
              frames: int = 16, seed: int = 0) -> dict[str, dict[str, str]]:
  """Writes videos, images and annotation files; returns {kind: {split: annotation path}}."""
  raw = os.path.join(out, "raw")
  os.makedirs(os.path.join(raw, "videos"), exist_ok=True)
  os.makedirs(os.path.join(raw, "images"), exist_ok=True)
  files: dict[str, dict[str, str]] = {k: {} for k in ("video_caption", "video_qa",
                                                      "video_retrieval", "image_text",
                                                      "video_classification")}
  for split, n, split_seed in (("train", num_train, seed), ("test", num_test, seed + 1)):
    rng = np.random.default_rng([split_seed, 1234])
    cap, qa, ret, img, cls = [], [], [], [], []
    for i in range(n):
      colour, shape, direction = _attributes(rng)
      name = f"demo_{split}_{i:05d}"
      clip = render_clip(rng, colour, shape, direction, size, frames)
      with open(os.path.join(raw, "videos", name + ".mp4"), "wb") as f:
        f.write(encode_mp4(clip))
      with open(os.path.join(raw, "images", name + ".jpg"), "wb") as f:
        f.write(encode_jpeg(clip[frames // 2]))
      fill = dict(c=colour, s=shape, d=DIRECTION_WORDS[direction])
      captions = [t.format(**fill) for t in CAPTION_TEMPLATES]
      if split == "train":
        cap.append({"video_id": name, "caption": captions[rng.integers(len(captions))]})
      else:
        cap.append({"video_id": name, "golden_captions": captions})
      qa += [{"video_id": name, "question": "what color is the shape?", "answer": colour},
             {"video_id": name, "question": f"what shape is the {colour} object?", "answer": shape},
             {"video_id": name, "question": f"which direction does the {shape} move?",
              "answer": direction}]
      ret.append({"clip_name": name, "caption": captions[0] if split == "train" else captions})
      cls.append(f"{direction},{name},0,2,{split}\n")   # Kinetics CSV, label = motion
      img.append({"image": name + ".jpg", "image_id": i,
                  "caption": IMAGE_TEMPLATES[rng.integers(len(IMAGE_TEMPLATES))].format(**fill)})
    for kind, rows, ext in (("video_caption", cap, "jsonl"), ("video_qa", qa, "jsonl"),
                            ("video_retrieval", ret, "jsonl"), ("image_text", img, "json")):
      path = os.path.join(raw, f"{kind}_{split}.{ext}")
      with open(path, "w", encoding="utf-8") as f:
        if ext == "json":
          json.dump(rows, f)
        else:
          f.writelines(json.dumps(r) + "\n" for r in rows)
      files[kind][split] = path
    path = os.path.join(raw, f"video_classification_{split}.csv")
    with open(path, "w", encoding="utf-8") as f:
      f.write("label,youtube_id,time_start,time_end,split\n")
      f.writelines(cls)
    files["video_classification"][split] = path
  return files


# The builder kind of each demo dataset (`build.build`).
BUILD_KIND = {"video_classification": "kinetics"}


def make_demo(out: str, num_train: int = 192, num_test: int = 48, size: int = 64,
              frames: int = 16, seed: int = 0, log=print) -> dict[str, str]:
  """Writes the raw demo data and builds all five datasets; returns {kind: dataset dir}."""
  from mplug2_jax.data import build

  start = time.time()
  files = write_raw(out, num_train, num_test, size, frames, seed)
  raw = os.path.join(out, "raw")
  built = {}
  for kind, splits in files.items():
    root = os.path.join(raw, "images" if kind == "image_text" else "videos")
    built[kind] = build.build(BUILD_KIND.get(kind, kind), os.path.join(out, kind),
                              {s: [p] for s, p in splits.items()}, root,
                              max_bad_fraction=0.0, log=lambda *_: None)
  log(f"demo data in {out} ({num_train} train / {num_test} test clips) "
      f"in {time.time() - start:.1f}s: " + ", ".join(built))
  return built


def main(argv: Sequence[str] | None = None) -> None:
  fv = flags.FlagValues()
  flags.DEFINE_string("out", None, "Output folder.", flag_values=fv)
  flags.DEFINE_integer("train", 192, "Training clips.", flag_values=fv)
  flags.DEFINE_integer("test", 48, "Held-out clips.", flag_values=fv)
  flags.DEFINE_integer("size", 64, "Frame side in pixels (even).", flag_values=fv)
  flags.DEFINE_integer("frames", 16, "Frames per clip.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Random seed.", flag_values=fv)
  flags.mark_flag_as_required("out", flag_values=fv)
  cli.parse(fv, argv, __doc__)
  make_demo(fv.out, fv.train, fv.test, fv.size, fv.frames, fv.seed)


if __name__ == "__main__":
  main()
