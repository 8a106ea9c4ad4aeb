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
  cv2 = _cv2()
  t, _, _, c = clip.shape
  out = np.empty((t, out_h, out_w, c), np.float32)
  ipp = cv2.ipp.useIPP()
  cv2.ipp.setUseIPP(RESIZE_USE_IPP)
  try:
    for i in range(t):
      # Frame by frame: the float copy of one frame stays in cache for the resize.
      cv2.resize(clip[i].astype(np.float32), (out_w, out_h), dst=out[i],
                 interpolation=cv2.INTER_CUBIC)
  finally:
    cv2.ipp.setUseIPP(ipp)
  return out.astype(np.int32)  # float -> int casts truncate toward zero, like `.long()`


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
  """The sampling grid of OpenCV 4.x `warpAffine(INTER_LINEAR)` for the official matrix.

  OpenCV 4.x inverts the matrix in double, rounds source coordinates to 1/1024 px, then to
  1/32 px, and interpolates with 15-bit fixed-point weights (`remap` with a CV_16SC2
  integer map + CV_16UC1 fraction-table index). OpenCV 5's `warpAffine` interpolates in
  float instead and differs by up to ~6 grey levels on half the pixels of a noisy frame;
  `cv2.remap` on this grid gives OpenCV 4.x's bytes (checked against 4.8.1), on any SIMD
  level. Returns (xy int16 (h, w, 2), fraction index uint16 (h, w)), read-only.
  """
  m = np.asarray(_official_matrix(op, h, w), np.float64).reshape(6)
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


def _affine_clip(clip: np.ndarray, op: str) -> np.ndarray:
  """One geometric RandAugment op on every frame of a uint8 (T, H, W, 3) clip."""
  cv2 = _cv2()
  xy, frac = _warp_grid(op, clip.shape[1], clip.shape[2])
  out = np.empty_like(clip)
  for i in range(clip.shape[0]):
    cv2.remap(clip[i], xy, frac, cv2.INTER_LINEAR, dst=out[i],
              borderMode=cv2.BORDER_CONSTANT, borderValue=_FILL)
  return out


def _affine(frame: np.ndarray, op: str) -> np.ndarray:
  """One RandAugment op at M = 5 (positive sign, fill 128) on a uint8 (H, W, 3) frame."""
  return _affine_clip(frame[None], op)[0]


def temporal_random_augment(clip: np.ndarray, rng: np.random.Generator, n: int = 2) -> np.ndarray:
  """TemporalConsistentRandomAugment(N=2, M=5): two distinct ops, same for every frame.

  At M = 5 Contrast/Brightness/Sharpness have factor 1.0 and are no-ops, like Identity.
  Geometry is the official OpenCV bilinear warp with fill 128, byte for byte as OpenCV 4.x
  computes it (`_warp_grid`).
  """
  ops = rng.choice(len(RANDAUG_OPS), size=n, replace=False)
  for op in (RANDAUG_OPS[i] for i in ops):
    if op in ("Identity", "Contrast", "Brightness", "Sharpness"):
      continue
    clip = _affine_clip(np.ascontiguousarray(clip), op)
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
