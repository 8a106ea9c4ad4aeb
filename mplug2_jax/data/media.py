"""Video and image decoding, the official frame sampler and the train/eval transforms.

Spec: `shared/spec/mplug2.md` section 8. Everything here is numpy + PyAV + Pillow + OpenCV
and runs inside Grain worker processes; randomness comes from an explicit
`np.random.Generator` so that a sample's augmentation depends only on (seed, index) and
resumes exactly. OpenCV does the per-pixel work (bicubic resize, RandAugment geometry,
normalisation) single-threaded; the numpy versions kept here (`*_reference`) define the
semantics and are what the tests compare against.

Clips are uint8/int arrays (T, H, W, 3) channels-last until `normalize`, which returns the
float32 CLIP-normalised model input. An image is a clip with T = 1.

Failures raise `BadSample(reason, detail)`; the pipeline replaces such samples and counts
them per reason (see `pipeline.py`).
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)

VIDEO_FORMATS = ("mp4", "avi", "webm", "mkv", "mov")
IMAGE_FORMATS = ("jpeg", "jpg", "png", "bmp", "webp")

# Reasons a sample can be bad; counted separately (pipeline and builders).
DECODE_THREADS = 1  # codec threads per decode (see decode_video)

REASONS = ("missing", "empty", "corrupt", "truncated", "no_frames", "bad_text", "empty_text",
           # builders: a malformed annotation record, a media path that resolves outside
           # the media folder, a path that is not a regular file (a FIFO, a directory)
           "bad_annotation", "outside_root", "not_a_file",
           # a sampling window (start_time / end_time) outside the clip
           "time_out_of_range")

# Intel IPP inside OpenCV makes the float bicubic resize ~2x faster, but its result depends
# on the CPU's SIMD level (AVX-512, AVX2 and SSE4.2 gave different bits); OpenCV's own
# kernel gave the same bits on all of them. Off: augmentations do not depend on the host.
RESIZE_USE_IPP = False


@functools.cache
def _cv2():
  """OpenCV, imported on first use and limited to one thread: Grain runs one worker process
  per core, so OpenCV's thread pool would only contend with the other workers."""
  import cv2

  cv2.setNumThreads(1)
  return cv2


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


def video_frames_and_rate(data: bytes) -> tuple[int, float]:
  """(frame count, frames per second) as `decode_video` reads them (25 when unknown)."""
  container = _open_video(data)
  try:
    stream = container.streams.video[0]
    fps = float(stream.average_rate or 0) or 25.0
    frames = int(stream.frames)
  finally:
    container.close()
  return (frames if frames > 0 else video_length(data)), fps


def decode_video(data: bytes, num_frames: int, mode: str, rng: np.random.Generator | None,
                 window: tuple[float, float] | None = None) -> np.ndarray:
  """Decodes the sampled frames of an encoded video with PyAV.

  Frames are decoded in order and stop after the last index needed; only the needed ones
  are converted to RGB. `window` = (start_s, end_s) restricts sampling to that span (video
  pre-training records; a start of 0 disables it, as in the official loader); a start at
  or beyond the last frame is `time_out_of_range` (officially the last frame, repeated).
  """
  import av

  container = _open_video(data)
  try:
    stream = container.streams.video[0]
    # Opening costs about one decoded frame (FFmpeg's stream probe decodes the first frames),
    # so the header's count is read from this container; `video_length` (a second open)
    # only when the header has none.
    vlen = int(stream.frames) if stream.frames > 0 else video_length(data)
    # One decoding thread: Grain runs one worker process per core, and extra codec
    # threads would only contend with the other workers.
    stream.thread_type = "SLICE"
    stream.codec_context.thread_count = DECODE_THREADS
    offset = 0
    if window is not None and window[0]:
      fps = float(stream.average_rate or 0) or 25.0
      offset = int(window[0] * fps)
      if not 0 <= offset < vlen:  # else every sampled frame would be the last one
        raise BadSample("time_out_of_range", f"start_time {window[0]:g}s is frame {offset} "
                        f"of a {vlen}-frame clip")
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


def bicubic_taps(in_size: int, out_size: int,
                 dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
  """Taps (out, 4) and weights (out, 4) of torch `F.interpolate(mode='bicubic',
  align_corners=False)`: source coordinate (d + 0.5) * in / out - 0.5, Keys kernel
  a = -0.75, taps clamped to the border, no antialiasing (the torch default)."""
  src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
  base = np.floor(src)
  t = src - base
  offsets = np.arange(-1, 3)
  taps = np.clip(base[:, None] + offsets, 0, in_size - 1).astype(np.intp)
  return taps, _cubic(t[:, None] - offsets).astype(dtype)


def _resize_rows(x: np.ndarray, out_size: int) -> np.ndarray:
  """Resizes axis 2 of (T, C, H, W) with 4 gathered rows per output row (4 MACs/output;
  rows are contiguous, so each gather is a block copy)."""
  taps, weights = bicubic_taps(x.shape[2], out_size, x.dtype)
  out = x[:, :, taps[:, 0]] * weights[:, 0, None]
  for k in range(1, 4):
    out += x[:, :, taps[:, k]] * weights[:, k, None]
  return out


def resize_bicubic_reference(clip: np.ndarray, out_h: int, out_w: int,
                             dtype=np.float32) -> np.ndarray:
  """torch's bicubic resize in numpy, before truncation: float (T, out_h, out_w, C).

  The definition the OpenCV path is tested against (with float64 it also tells which
  pixels sit so close to an integer that float32 summation order decides the truncation).
  """
  x = np.ascontiguousarray(clip.transpose(0, 3, 1, 2), dtype=dtype)  # (T, C, H, W)
  x = _resize_rows(x, out_h)
  x = _resize_rows(np.ascontiguousarray(x.transpose(0, 1, 3, 2)), out_w)  # (T, C, W', H')
  return x.transpose(0, 3, 2, 1)


def resize_bicubic_trunc_reference(clip: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """`resize_bicubic_trunc` in numpy (5x slower); for tests."""
  return np.trunc(resize_bicubic_reference(clip, out_h, out_w)).astype(np.int32)


def resize_bicubic_trunc(clip: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Bicubic resize then `.long()`: truncation toward zero, no clamping -> int32.

  OpenCV's float32 INTER_CUBIC has torch's semantics (Keys a = -0.75, source coordinate
  (d + 0.5) * in / out - 0.5, replicated border, no antialiasing); float32 input keeps the
  values unclamped (the uint8 path would saturate and round). Results equal the numpy
  reference except for pixels whose exact value is an integer or within float32 rounding of
  one, where summation order decides the truncation (+-1; see tests/test_data_media.py).
  """
  # Frame by frame (`resize_bicubic_trunc_float`): one float frame stays in cache.
  return resize_bicubic_trunc_float(clip, out_h, out_w).astype(np.int32)  # `.long()`


def resize_bicubic_trunc_float(clip: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """`resize_bicubic_trunc` before the truncation: float32 (T, out_h, out_w, C)."""
  cv2 = _cv2()
  t, _, _, c = clip.shape
  out = np.empty((t, out_h, out_w, c), np.float32)
  ipp = cv2.ipp.useIPP()
  cv2.ipp.setUseIPP(RESIZE_USE_IPP)
  try:
    for i in range(t):
      cv2.resize(clip[i].astype(np.float32), (out_w, out_h), dst=out[i],
                 interpolation=cv2.INTER_CUBIC)
  finally:
    cv2.ipp.setUseIPP(ipp)
  return out


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


# RandAugment at M = 5 of MAX_LEVEL 10, positive sign only (official randaugment_video.py):
# shear 0.3 * M / 10, translation 10 * M / 10 px, rotation 30 * M / 10 degrees, fill 128.
_RANDAUG_LEVEL = 5 / 10
_FILL = (128, 128, 128)


def _official_matrix(op: str, h: int, w: int) -> np.ndarray:
  """The 2x3 matrix the official code passes to `cv2.warpAffine` (a forward map: OpenCV
  inverts it, so a translation by -5 moves the content 5 px left/up)."""
  shear, shift = _RANDAUG_LEVEL * 0.3, _RANDAUG_LEVEL * 10.0
  if op == "ShearX":
    return np.float32([[1, shear, 0], [0, 1, 0]])
  if op == "ShearY":
    return np.float32([[1, 0, 0], [shear, 1, 0]])
  if op == "TranslateX":
    return np.float32([[1, 0, -shift], [0, 1, 0]])
  if op == "TranslateY":
    return np.float32([[1, 0, 0], [0, 1, -shift]])
  if op == "Rotate":  # counter-clockwise about (w / 2, h / 2)
    return _cv2().getRotationMatrix2D((w / 2, h / 2), _RANDAUG_LEVEL * 30, 1)
  raise ValueError(op)


@functools.lru_cache(maxsize=64)
def _warp_grid(op: str, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  """`_matrix_grid` of the video RandAugment op `op` (the official matrix)."""
  return _matrix_grid(tuple(np.asarray(_official_matrix(op, h, w), np.float64).reshape(6)),
                      h, w)


@functools.lru_cache(maxsize=256)
def _matrix_grid(matrix: tuple[float, ...], h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  """The sampling grid of OpenCV 4.x `warpAffine(INTER_LINEAR)` for the forward 2x3 matrix
  `matrix` (row-major, 6 values).

  OpenCV 4.x inverts the matrix in double, rounds source coordinates to 1/1024 px, then to
  1/32 px, and interpolates with 15-bit fixed-point weights (`remap` with a CV_16SC2
  integer map + CV_16UC1 fraction-table index). OpenCV 5's `warpAffine` interpolates in
  float instead and differs by up to ~6 grey levels on half the pixels of a noisy frame;
  `cv2.remap` on this grid gives OpenCV 4.x's bytes (checked against 4.8.1), on any SIMD
  level. Returns (xy int16 (h, w, 2), fraction index uint16 (h, w)), read-only.
  """
  m = np.asarray(matrix, np.float64)
  det = m[0] * m[4] - m[1] * m[3]
  det = 1.0 / det if det != 0 else 0.0
  a, b, c, d = m[4] * det, -m[1] * det, -m[3] * det, m[0] * det  # inverse linear part
  e = -a * m[2] - b * m[5]
  f = -c * m[2] - d * m[5]
  ab_scale, round_delta = 1 << 10, (1 << 10) // 32 // 2
  cols, rows = np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)
  # np.rint rounds half to even, like OpenCV's saturate_cast<int>(double) (cvRound).
  x = (np.rint((b * rows + e) * ab_scale).astype(np.int64)[:, None] + round_delta
       + np.rint(a * cols * ab_scale).astype(np.int64)[None]) >> 5
  y = (np.rint((d * rows + f) * ab_scale).astype(np.int64)[:, None] + round_delta
       + np.rint(c * cols * ab_scale).astype(np.int64)[None]) >> 5
  xy = np.stack([x >> 5, y >> 5], axis=-1).clip(-32768, 32767).astype(np.int16)
  frac = ((y & 31) * 32 + (x & 31)).astype(np.uint16)
  xy.setflags(write=False)
  frac.setflags(write=False)
  return xy, frac


def _warp(clip: np.ndarray, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
  """Every frame of a uint8 (T, H, W, 3) clip through the OpenCV 4.x warp `grid`, fill 128."""
  cv2 = _cv2()
  xy, frac = grid
  out = np.empty_like(clip)
  for i in range(clip.shape[0]):
    cv2.remap(clip[i], xy, frac, cv2.INTER_LINEAR, dst=out[i],
              borderMode=cv2.BORDER_CONSTANT, borderValue=_FILL)
  return out


def _affine_clip(clip: np.ndarray, op: str) -> np.ndarray:
  """One geometric RandAugment op on every frame of a uint8 (T, H, W, 3) clip."""
  if op == "HorizontalFlip":
    return np.ascontiguousarray(clip[:, :, ::-1])
  return _warp(clip, _warp_grid(op, clip.shape[1], clip.shape[2]))


def _affine(frame: np.ndarray, op: str) -> np.ndarray:
  """One RandAugment op at M = 5 (positive sign, fill 128) on a uint8 (H, W, 3) frame."""
  return _affine_clip(frame[None], op)[0]


def temporal_random_augment(clip: np.ndarray, rng: np.random.Generator, n: int = 2,
                            ops: tuple[str, ...] = RANDAUG_OPS) -> np.ndarray:
  """TemporalConsistentRandomAugment(N=2, M=5): two distinct ops, same for every frame.

  At M = 5 Contrast/Brightness/Sharpness have factor 1.0 and are no-ops, like Identity.
  Geometry is the official OpenCV bilinear warp with fill 128, byte for byte as OpenCV 4.x
  computes it (`_warp_grid`). The video pretraining list adds "HorizontalFlip" (every frame
  mirrored) [its implementation in `randaugment_video.py` is unverified].
  """
  chosen = rng.choice(len(ops), size=n, replace=False)
  for op in (ops[i] for i in chosen):
    if op in ("Identity", "Contrast", "Brightness", "Sharpness"):
      continue
    clip = _affine_clip(np.ascontiguousarray(clip), op)
  return clip


ROUNDINGS = ("truncate", "round")


def _to_pixels(x: np.ndarray, rounding: str) -> np.ndarray:
  """Resized float pixels -> int32: official `.long()` truncation toward zero, values
  outside [0, 255] kept ("truncate"), or rounded and clamped to [0, 255] ("round")."""
  if rounding == "truncate":
    return x.astype(np.int32)  # float -> int casts truncate toward zero, like `.long()`
  if rounding == "round":
    return np.clip(np.rint(x), 0, 255).astype(np.int32)
  raise ValueError(f"config.data.bicubic_rounding={rounding!r}: one of {ROUNDINGS}")


def train_transform(clip: np.ndarray, size: int, rng: np.random.Generator,
                    randaug: bool = True, scale=(0.5, 1.0), hflip: bool = True,
                    rounding: str = "truncate") -> np.ndarray:
  """RandomResizedCrop (bicubic, truncation) -> flip p 0.5 -> RandAugment -> int32 clip.

  `hflip` False skips the flip (text that names left and right would be mislabelled);
  the random draw is made either way, so the other augmentations do not change.

  With RandAugment the clip is cast to uint8 first, so out-of-range bicubic values wrap
  around as in the official `.astype(np.uint8)`; without it they are kept as they are.
  `rounding="round"` rounds and clamps the resized pixels instead (no wrap-around).
  """
  top, left, ch, cw = random_resized_crop_box(clip.shape[1], clip.shape[2], rng, scale)
  crop = clip[:, top:top + ch, left:left + cw]
  if rounding == "truncate":
    out = resize_bicubic_trunc(crop, size, size)
  else:
    out = _to_pixels(resize_bicubic_trunc_float(crop, size, size), rounding)
  if rng.random() < 0.5 and hflip:
    out = out[:, :, ::-1]
  if randaug:
    out = temporal_random_augment(out.astype(np.uint8), rng)  # int -> uint8 wraps mod 256
  return out


def pretrain_video_transform(clip: np.ndarray, size: int, rng: np.random.Generator,
                             randaug: bool = True) -> np.ndarray:
  """Official video pretraining transform (M2 `dataset/__init__.py:45-53`): resize to
  int(1.14 size) square (the video `Resize` default, nearest), TemporalConsistent
  RandAugment(2, 5) over the nine ops + HorizontalFlip, RandomCrop(size) (one offset for
  the clip) -> uint8 clip."""
  big = int(size * 1.14)
  out = resize_nearest(clip, big, big)
  if randaug:
    out = temporal_random_augment(np.ascontiguousarray(out, np.uint8), rng,
                                  ops=RANDAUG_OPS + ("HorizontalFlip",))
  top = int(rng.integers(0, big - size + 1))
  left = int(rng.integers(0, big - size + 1))
  return np.ascontiguousarray(out[:, top:top + size, left:left + size])


def eval_transform(clip: np.ndarray, size: int, resize: str = "nearest") -> np.ndarray:
  """Resize to size x size (aspect ratio not kept, no crop): official nearest neighbour
  (the video `Resize` default, M2 `dataset/__init__.py:71-75`), or "bicubic" (torch's
  bicubic, rounded and clamped)."""
  if resize == "nearest":
    return resize_nearest(clip, size, size)
  if resize == "bicubic":
    return _to_pixels(resize_bicubic_trunc_float(clip, size, size), "round").astype(np.uint8)
  raise ValueError(f"config.data.video_eval_resize={resize!r}: 'nearest' or 'bicubic'")


# --------------------------------------------------------------------------------------
# Image transforms (official image loaders, M2 `dataset/__init__.py:23-43`; PIL + ALBEF's
# `RandomAugment`).
# --------------------------------------------------------------------------------------

IMAGE_RANDAUG_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
                     "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
_IMAGE_MAX_LEVEL = 10


def _pil_bicubic(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Pillow's BICUBIC resize (antialiased, rounded to uint8): torchvision's `Resize` /
  `RandomResizedCrop(interpolation=BICUBIC)` on a PIL image."""
  from PIL import Image

  return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(
      (out_w, out_h), Image.BICUBIC))


def _wrap_uint8(x: np.ndarray, clamp: bool) -> np.ndarray:
  """float -> uint8 as `.astype(np.uint8)` behaves on x86 (truncation, then modulo 256), or
  clamped to [0, 255] first (`clamp`)."""
  if clamp:
    return np.clip(x, 0, 255).astype(np.uint8)
  return (np.trunc(x).astype(np.int64) % 256).astype(np.uint8)


def _autocontrast(img: np.ndarray) -> np.ndarray:
  """Per channel, [min, max] stretched to [0, 255] (PIL `autocontrast`, cutoff 0)."""
  out = np.empty_like(img)
  for ch in range(img.shape[-1]):
    x = img[..., ch]
    low, high = int(x.min()), int(x.max())
    if high <= low:
      out[..., ch] = x
      continue
    scale = 255.0 / (high - low)
    table = np.clip(np.arange(256) * scale - low * scale, 0, 255).astype(np.uint8)
    out[..., ch] = table[x]
  return out


def _equalize(img: np.ndarray) -> np.ndarray:
  """Per channel, PIL's `equalize`: step = (pixels - the last non-empty bin's) // 255; bin
  v -> (step // 2 + pixels below v) // step; a channel with step 0 is kept."""
  out = np.empty_like(img)
  for ch in range(img.shape[-1]):
    x = img[..., ch]
    hist = np.bincount(x.reshape(-1), minlength=256)
    nonzero = hist[hist != 0]
    step = int(nonzero[:-1].sum()) // 255
    if step == 0:
      out[..., ch] = x
      continue
    below = np.concatenate([[step // 2], hist[:-1]])
    out[..., ch] = np.clip(np.cumsum(below) // step, 0, 255).astype(np.uint8)[x]
  return out


def _brightness(img: np.ndarray, factor: float) -> np.ndarray:
  table = np.clip(np.arange(256, dtype=np.float32) * np.float32(factor), 0, 255).astype(np.uint8)
  return table[img]


def _sharpness(img: np.ndarray, factor: float, clamp: bool) -> np.ndarray:
  """Blend with the 3x3 smoothing (1 1 1 / 1 5 1 / 1 1 1) / 13 inside a 1-pixel border."""
  if factor == 1.0:
    return img
  kernel = np.ones((3, 3), np.float32)
  kernel[1, 1] = 5
  degenerate = _cv2().filter2D(img, -1, kernel / 13)
  if factor == 0.0:
    return degenerate
  out = img.astype(np.float32)
  inner = degenerate.astype(np.float32)[1:-1, 1:-1]
  out[1:-1, 1:-1] = inner + np.float32(factor) * (out[1:-1, 1:-1] - inner)
  return _wrap_uint8(out, clamp)


def image_random_augment(image: np.ndarray, rng: np.random.Generator, n: int = 2,
                         magnitude: int = 7, ops: tuple[str, ...] = IMAGE_RANDAUG_OPS,
                         clamp: bool = False) -> np.ndarray:
  """ALBEF's `RandomAugment(N, M, isPIL=True, augs)` on a uint8 (H, W, 3) image.

  N ops drawn **with** replacement, each applied with p 0.5; at level M of 10: Brightness
  and Sharpness factor M / 10 x 1.8 + 0.1, Rotate M / 10 x 30 degrees, ShearX/Y M / 10 x
  0.3, TranslateX/Y M px, each geometric op with a random sign, bilinear with fill 128
  (OpenCV 4.x's bytes, `_matrix_grid`); AutoContrast and Equalize as PIL's. Sharpness
  casts its float result with `.astype(np.uint8)` (wrap-around out of range; `clamp`
  clamps instead).
  """
  h, w = image.shape[:2]
  level = magnitude / _IMAGE_MAX_LEVEL
  for op in (ops[i] for i in rng.choice(len(ops), size=n, replace=True)):
    if rng.random() > 0.5:
      continue
    if op == "AutoContrast":
      image = _autocontrast(image)
    elif op == "Equalize":
      image = _equalize(image)
    elif op == "Brightness":
      image = _brightness(image, level * 1.8 + 0.1)
    elif op == "Sharpness":
      image = _sharpness(image, level * 1.8 + 0.1, clamp)
    elif op in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
      if op == "Rotate":  # a float64 matrix
        v = level * 30 * (-1 if rng.random() < 0.5 else 1)
        matrix = np.asarray(_cv2().getRotationMatrix2D((w / 2, h / 2), v, 1), np.float64)
      else:  # float32 matrices, as the official np.float32([...])
        v = level * (0.3 if op.startswith("Shear") else 10.0)
        v = -v if rng.random() > 0.5 else v
        matrix = np.asarray({"ShearX": [[1, v, 0], [0, 1, 0]], "ShearY": [[1, 0, 0], [v, 1, 0]],
                             "TranslateX": [[1, 0, -v], [0, 1, 0]],
                             "TranslateY": [[1, 0, 0], [0, 1, -v]]}[op],
                            np.float32).astype(np.float64)
      matrix = tuple(matrix.reshape(6).tolist())
      image = _warp(np.ascontiguousarray(image)[None], _matrix_grid(matrix, h, w))[0]
    elif op != "Identity":
      raise ValueError(f"unknown image RandAugment op {op!r}; known: {IMAGE_RANDAUG_OPS}")
  return image


def image_train_transform(image: np.ndarray, size: int, rng: np.random.Generator,
                          randaug: bool = True, scale=(0.5, 1.0), hflip: bool = True,
                          clamp: bool = False) -> np.ndarray:
  """Official image training transform on a uint8 (1, H, W, 3) image: RandomResizedCrop
  (`scale`; Pillow bicubic) -> horizontal flip p 0.5 -> RandomAugment(2, 7) with
  AutoContrast / Equalize -> uint8 (1, size, size, 3). Fine-tuning scale (0.5, 1), image
  pretraining (0.2, 1) (M2 `dataset/__init__.py:23-38`)."""
  top, left, ch, cw = random_resized_crop_box(image.shape[1], image.shape[2], rng, scale)
  out = _pil_bicubic(image[0, top:top + ch, left:left + cw], size, size)
  if rng.random() < 0.5 and hflip:
    out = np.ascontiguousarray(out[:, ::-1])
  if randaug:
    out = image_random_augment(out, rng, clamp=clamp)
  return out[None]


def image_eval_transform(image: np.ndarray, size: int) -> np.ndarray:
  """Official image test transform: Pillow bicubic resize to size x size (M2
  `dataset/__init__.py:39-43`) -> uint8 (T, size, size, 3)."""
  return np.stack([_pil_bicubic(f, size, size) for f in image])


def normalize_reference(clip: np.ndarray) -> np.ndarray:
  """(pixel / 255 - CLIP mean) / CLIP std in float32 arithmetic, float32 (T, H, W, 3)."""
  return ((clip.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32)


# normalize_reference of every uint8 value per channel, (1, 256, 3): the same float32
# operations, so a table look-up gives the same bits.
_NORMALIZE_TABLE = normalize_reference(np.arange(256, dtype=np.uint8)[:, None].repeat(3, 1)
                                       [None, None])[0]


def normalize(clip: np.ndarray) -> np.ndarray:
  """`normalize_reference`; uint8 clips by one OpenCV table look-up (one pass, not five)."""
  if clip.dtype != np.uint8 or clip.shape[-1] != 3:
    return normalize_reference(clip)  # int32 without RandAugment: may leave [0, 255]
  flat = np.ascontiguousarray(clip).reshape(-1, clip.shape[-2], 3)
  return _cv2().LUT(flat, _NORMALIZE_TABLE).reshape(clip.shape)
