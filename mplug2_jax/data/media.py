"""Video and image decoding, the official frame sampler and the train/eval transforms.

Spec: `shared/spec/mplug2.md` section 8. Everything here is plain numpy + PyAV + Pillow and
runs inside Grain worker processes; randomness comes from an explicit `np.random.Generator`
so that a sample's augmentation depends only on (seed, index) and resumes exactly.

Clips are uint8/int arrays (T, H, W, 3) channels-last until `normalize`, which returns the
float32 CLIP-normalised model input. An image is a clip with T = 1.

Failures raise `BadSample(reason, detail)`; the pipeline replaces such samples and counts
them per reason (see `pipeline.py`).
"""

from __future__ import annotations

import io
import math

import numpy as np

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)

VIDEO_FORMATS = ("mp4", "avi", "webm", "mkv", "mov")
IMAGE_FORMATS = ("jpeg", "jpg", "png", "bmp", "webp")

# Reasons a sample can be bad; counted separately (pipeline and builders).
DECODE_THREADS = 1  # codec threads per decode (see decode_video)

REASONS = ("missing", "empty", "corrupt", "truncated", "no_frames", "bad_text", "empty_text")


class BadSample(Exception):
  """A sample that cannot be used. `reason` is one of REASONS."""

  def __init__(self, reason: str, detail: str = ""):
    assert reason in REASONS, reason
    self.reason, self.detail = reason, detail
    super().__init__(f"{reason}: {detail}" if detail else reason)


# --------------------------------------------------------------------------------------
# Frame sampling (official `video_utils/utils.py:15-40`).
# --------------------------------------------------------------------------------------


def sample_frame_indices(vlen: int, num_frames: int, mode: str,
                         rng: np.random.Generator | None = None) -> np.ndarray:
  """Indices of the frames to decode, length `num_frames`.

  [0, vlen) is split into n = min(num_frames, vlen) intervals by
  `linspace(0, vlen, n + 1).astype(int)`; interval k is [s_k, s_{k+1} - 1].
  'rand': one index uniform in range(s_k, s_{k+1} - 1) (the interval's last frame is never
  drawn); if any of those ranges is empty, a sorted random subset of n frames instead.
  'middle': (s_k + s_{k+1} - 1) // 2. Fewer than num_frames indices are padded with the last.
  """
  if vlen <= 0:
    raise BadSample("no_frames", f"vlen={vlen}")
  n = min(num_frames, vlen)
  edges = np.linspace(0, vlen, n + 1).astype(int)
  starts, ends = edges[:-1], edges[1:] - 1
  if mode == "rand":
    if rng is None:
      raise ValueError("'rand' sampling needs an rng")
    if np.any(ends - starts < 1):
      idx = np.sort(rng.permutation(vlen)[:n])
    else:
      idx = starts + np.floor(rng.random(n) * (ends - starts)).astype(int)
  elif mode == "middle":
    idx = (starts + ends) // 2
  else:
    raise ValueError(f"unknown frame sampling mode {mode!r} (want 'rand' or 'middle')")
  if n < num_frames:
    idx = np.concatenate([idx, np.full(num_frames - n, idx[-1])])
  return idx.astype(np.int64)


# --------------------------------------------------------------------------------------
# Decoding.
# --------------------------------------------------------------------------------------


def decode(data: bytes, fmt: str, num_frames: int, mode: str,
           rng: np.random.Generator | None, window: tuple[float, float] | None = None,
           ) -> np.ndarray:
  """Encoded bytes -> uint8 (T, H, W, 3). Images give T = 1 (the pipeline may repeat them)."""
  if not data:
    raise BadSample("empty", "zero-length media")
  fmt = fmt.lower()
  if fmt in IMAGE_FORMATS:
    return decode_image(data)
  if fmt == "gif":
    return decode_gif(data, num_frames, mode, rng)
  return decode_video(data, num_frames, mode, rng, window)


def decode_image(data: bytes) -> np.ndarray:
  from PIL import Image

  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      return np.asarray(img.convert("RGB"))[None]
  except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for broken files
    reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
    raise BadSample(reason, f"image: {e}") from None


def decode_gif(data: bytes, num_frames: int, mode: str,
               rng: np.random.Generator | None) -> np.ndarray:
  """GIFs are read with Pillow, as the official TGIF loader does."""
  from PIL import Image

  try:
    with Image.open(io.BytesIO(data)) as img:
      vlen = getattr(img, "n_frames", 1)
      idx = sample_frame_indices(vlen, num_frames, mode, rng)
      frames = {}
      for i in sorted(set(idx.tolist())):
        img.seek(i)
        frames[i] = np.asarray(img.convert("RGB"))
      return np.stack([frames[i] for i in idx.tolist()])
  except (OSError, ValueError, SyntaxError, EOFError) as e:
    raise BadSample("corrupt", f"gif: {e}") from None


def _open_video(data: bytes):
  import av

  try:
    container = av.open(io.BytesIO(data), mode="r")
  except (av.error.FFmpegError, ValueError) as e:
    raise BadSample("corrupt", f"open: {e}") from None
  if not container.streams.video:
    container.close()
    raise BadSample("corrupt", "no video stream")
  return container


def video_length(data: bytes) -> int:
  """Frame count: from the container header, else by counting packets (no decoding)."""
  container = _open_video(data)
  try:
    stream = container.streams.video[0]
    if stream.frames > 0:
      return int(stream.frames)
    return sum(1 for p in container.demux(stream) if p.size)
  finally:
    container.close()


def decode_video(data: bytes, num_frames: int, mode: str, rng: np.random.Generator | None,
                 window: tuple[float, float] | None = None) -> np.ndarray:
  """Decodes the sampled frames of an encoded video with PyAV.

  Frames are decoded in order and stop after the last index needed; only the needed ones
  are converted to RGB. `window` = (start_s, end_s) restricts sampling to that span (video
  pre-training records; a start of 0 disables it, as in the official loader).
  """
  import av

  vlen = video_length(data)
  container = _open_video(data)
  try:
    stream = container.streams.video[0]
    # One decoding thread: Grain runs one worker process per core, and extra codec
    # threads would only contend with the other workers.
    stream.thread_type = "SLICE"
    stream.codec_context.thread_count = DECODE_THREADS
    offset = 0
    if window is not None and window[0]:
      fps = float(stream.average_rate or 0) or 25.0
      offset = min(int(window[0] * fps), vlen - 1)
      vlen = max(1, min(vlen, int(math.ceil(window[1] * fps))) - offset)
    idx = sample_frame_indices(vlen, num_frames, mode, rng) + offset
    wanted = set(idx.tolist())
    last = int(idx.max())
    frames: dict[int, np.ndarray] = {}
    i = -1
    try:
      for i, frame in enumerate(container.decode(stream)):
        if i in wanted:
          frames[i] = frame.to_ndarray(format="rgb24")
        if i >= last:
          break
    except (av.error.FFmpegError, ValueError) as e:
      if not frames:
        raise BadSample("corrupt", f"decode: {e}") from None
      raise BadSample("truncated", f"decode stopped at frame {i + 1} of {vlen}: {e}") from None
  finally:
    container.close()
  if len(frames) < len(wanted):
    if i < 0:
      raise BadSample("no_frames", "no decodable frame")
    raise BadSample("truncated", f"{i + 1} frames decoded, header says {vlen}")
  return np.stack([frames[j] for j in idx.tolist()])


# --------------------------------------------------------------------------------------
# Resizing with the official semantics.
# --------------------------------------------------------------------------------------


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
  x = np.abs(x)
  return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Taps (out, 4) and weights (out, 4) of torch `F.interpolate(mode='bicubic',
  align_corners=False)`: source coordinate (d + 0.5) * in / out - 0.5, Keys kernel
  a = -0.75, taps clamped to the border, no antialiasing (the torch default)."""
  src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
  base = np.floor(src)
  t = src - base
  offsets = np.arange(-1, 3)
  taps = np.clip(base[:, None] + offsets, 0, in_size - 1).astype(np.intp)
  return taps, _cubic(t[:, None] - offsets).astype(np.float32)


def _resize_rows(x: np.ndarray, out_size: int) -> np.ndarray:
  """Resizes axis 2 of (T, C, H, W) with 4 gathered rows per output row (4 MACs/output;
  rows are contiguous, so each gather is a block copy)."""
  taps, weights = bicubic_taps(x.shape[2], out_size)
  out = x[:, :, taps[:, 0]] * weights[:, 0, None]
  for k in range(1, 4):
    out += x[:, :, taps[:, k]] * weights[:, k, None]
  return out


def resize_bicubic_trunc(clip: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Bicubic resize then `.long()`: truncation toward zero, no clamping -> int32."""
  x = np.ascontiguousarray(clip.transpose(0, 3, 1, 2), dtype=np.float32)  # (T, C, H, W)
  x = _resize_rows(x, out_h)
  x = _resize_rows(np.ascontiguousarray(x.transpose(0, 1, 3, 2)), out_w)  # (T, C, W', H')
  return np.trunc(x).astype(np.int32).transpose(0, 3, 2, 1)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source rows of torch `mode='nearest'`: floor(d * in / out)."""
  return np.minimum(np.floor(np.arange(out_size) * (in_size / out_size)).astype(int),
                    in_size - 1)


def resize_nearest(clip: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  return clip[:, nearest_indices(clip.shape[1], out_h)][:, :, nearest_indices(clip.shape[2], out_w)]


# --------------------------------------------------------------------------------------
# Train / eval transforms (spec 8).
# --------------------------------------------------------------------------------------


def random_resized_crop_box(h: int, w: int, rng: np.random.Generator,
                            scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """(top, left, height, width) with torchvision's RandomResizedCrop rule."""
  area = h * w
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    cw = int(round(math.sqrt(target * aspect)))
    ch = int(round(math.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
  # Fallback: central crop at the nearest allowed aspect ratio.
  in_ratio = w / h
  if in_ratio < ratio[0]:
    cw, ch = w, int(round(w / ratio[0]))
  elif in_ratio > ratio[1]:
    ch, cw = h, int(round(h * ratio[1]))
  else:
    cw, ch = w, h
  return (h - ch) // 2, (w - cw) // 2, ch, cw


RANDAUG_OPS = ("Identity", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
               "TranslateX", "TranslateY", "Rotate")


def _affine(frame: np.ndarray, op: str) -> np.ndarray:
  """One RandAugment op at M = 5 (positive sign, fill 128) on a uint8 (H, W, 3) frame."""
  from PIL import Image

  img = Image.fromarray(frame)
  fill = (128, 128, 128)
  # PIL's affine maps *output* to *input* coordinates: pass the inverse of the forward map.
  if op == "ShearX":
    data = (1, -0.15, 0, 0, 1, 0)
  elif op == "ShearY":
    data = (1, 0, 0, -0.15, 1, 0)
  elif op == "TranslateX":
    data = (1, 0, -5, 0, 1, 0)
  elif op == "TranslateY":
    data = (1, 0, 0, 0, 1, -5)
  elif op == "Rotate":  # 15 degrees counter-clockwise about the centre
    return np.asarray(img.rotate(15, resample=Image.BILINEAR, fillcolor=fill))
  else:
    raise ValueError(op)
  return np.asarray(img.transform(img.size, Image.AFFINE, data, resample=Image.BILINEAR,
                                  fillcolor=fill))


def temporal_random_augment(clip: np.ndarray, rng: np.random.Generator, n: int = 2) -> np.ndarray:
  """TemporalConsistentRandomAugment(N=2, M=5): two distinct ops, same for every frame.

  At M = 5 Contrast/Brightness/Sharpness have factor 1.0 and are no-ops, like Identity.
  Geometry is resampled bilinearly with Pillow (the official code uses OpenCV; results can
  differ by a grey level at some pixels).
  """
  ops = rng.choice(len(RANDAUG_OPS), size=n, replace=False)
  for op in (RANDAUG_OPS[i] for i in ops):
    if op in ("Identity", "Contrast", "Brightness", "Sharpness"):
      continue
    clip = np.stack([_affine(f, op) for f in clip])
  return clip


def train_transform(clip: np.ndarray, size: int, rng: np.random.Generator,
                    randaug: bool = True, scale=(0.5, 1.0), hflip: bool = True) -> np.ndarray:
  """RandomResizedCrop (bicubic, truncation) -> flip p 0.5 -> RandAugment -> int32 clip.

  `hflip` False skips the flip (text that names left and right would be mislabelled);
  the random draw is made either way, so the other augmentations do not change.

  With RandAugment the clip is cast to uint8 first, so out-of-range bicubic values wrap
  around as in the official `.astype(np.uint8)`; without it they are kept as they are.
  """
  top, left, ch, cw = random_resized_crop_box(clip.shape[1], clip.shape[2], rng, scale)
  out = resize_bicubic_trunc(clip[:, top:top + ch, left:left + cw], size, size)
  if rng.random() < 0.5 and hflip:
    out = out[:, :, ::-1]
  if randaug:
    out = temporal_random_augment(out.astype(np.uint8), rng)  # int -> uint8 wraps mod 256
  return out


def eval_transform(clip: np.ndarray, size: int) -> np.ndarray:
  """Resize to size x size with nearest neighbour (aspect ratio not kept, no crop)."""
  return resize_nearest(clip, size, size)


def normalize(clip: np.ndarray) -> np.ndarray:
  """(pixel / 255 - CLIP mean) / CLIP std, float32 (T, H, W, 3)."""
  return ((clip.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32)
