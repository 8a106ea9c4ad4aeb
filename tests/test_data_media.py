"""Frame sampler against the spec, decoding (mp4/gif/jpeg), transforms, bad media."""

import io

import numpy as np
import pytest

from mplug2_jax.data import demo, media


# ---- frame sampler (spec mplug2.md section 8) ---------------------------------------


@pytest.mark.parametrize("vlen", [1, 5, 16, 17, 20, 31, 32, 33, 100, 301])
def test_middle_sampling_matches_spec(vlen):
  n = min(16, vlen)
  edges = np.linspace(0, vlen, n + 1).astype(int)
  expected = [(edges[k] + edges[k + 1] - 1) // 2 for k in range(n)]
  expected += [expected[-1]] * (16 - n)
  np.testing.assert_array_equal(media.sample_frame_indices(vlen, 16, "middle"), expected)


@pytest.mark.parametrize("vlen", [40, 100, 301])
def test_rand_sampling_in_intervals_excluding_last_frame(vlen):
  edges = np.linspace(0, vlen, 17).astype(int)
  seen = set()
  for seed in range(200):
    idx = media.sample_frame_indices(vlen, 16, "rand", np.random.default_rng(seed))
    assert len(idx) == 16
    for k, i in enumerate(idx):
      assert edges[k] <= i < edges[k + 1] - 1  # range(s_k, s_{k+1} - 1)
    seen.add(int(idx[0]))
  assert seen == set(range(edges[0], edges[1] - 1))  # uniform over the whole range


def test_rand_sampling_fallback_and_padding():
  # vlen 20: some intervals have one frame -> sorted random subset of 16 distinct frames.
  idx = media.sample_frame_indices(20, 16, "rand", np.random.default_rng(0))
  assert len(set(idx.tolist())) == 16 and (np.diff(idx) > 0).all() and idx.max() < 20
  idx = media.sample_frame_indices(5, 16, "rand", np.random.default_rng(0))
  assert sorted(set(idx[:5].tolist())) == [0, 1, 2, 3, 4] and (idx[5:] == idx[4]).all()
  with pytest.raises(media.BadSample) as e:
    media.sample_frame_indices(0, 16, "middle")
  assert e.value.reason == "no_frames"


# ---- decoding -----------------------------------------------------------------------


def _numbered_clip(frames=40, size=32):
  """Frame t is uniform grey 6 * t: the decoded index can be read back from the mean."""
  return np.stack([np.full((size, size, 3), 6 * t, np.uint8) for t in range(frames)])


@pytest.fixture(scope="module")
def numbered_mp4():
  return demo.encode_mp4(_numbered_clip(), fps=10)


def test_mp4_decodes_the_sampled_frames(numbered_mp4):
  assert media.video_length(numbered_mp4) == 40
  for mode in ("middle", "rand"):
    rng = np.random.default_rng(3)
    clip = media.decode(numbered_mp4, "mp4", 16, mode, rng)
    expected = media.sample_frame_indices(40, 16, mode, np.random.default_rng(3))
    assert clip.shape == (16, 32, 32, 3) and clip.dtype == np.uint8
    np.testing.assert_array_equal(np.round(clip.mean(axis=(1, 2, 3)) / 6), expected)


def test_window_restricts_sampling(numbered_mp4):
  clip = media.decode(numbered_mp4, "mp4", 4, "middle", None, window=(2.0, 3.0))  # 10 fps
  got = np.round(clip.mean(axis=(1, 2, 3)) / 6)
  assert got.min() >= 20 and got.max() < 30


def test_gif_and_images():
  from PIL import Image

  frames = [Image.fromarray(f) for f in _numbered_clip(10, 16)]
  buf = io.BytesIO()
  frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100)
  clip = media.decode(buf.getvalue(), "gif", 4, "middle", None)
  np.testing.assert_allclose(clip.mean(axis=(1, 2, 3)) / 6,
                             media.sample_frame_indices(10, 4, "middle"), atol=0.5)
  img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8)
  for fmt, data in (("jpeg", demo.encode_jpeg(img, 100)), ("png", _png(img))):
    out = media.decode(data, fmt, 16, "rand", np.random.default_rng(0))
    assert out.shape == (1, 20, 30, 3)
  np.testing.assert_array_equal(media.decode(_png(img), "png", 1, "middle", None)[0], img)


def _png(img):
  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  return buf.getvalue()


@pytest.mark.parametrize("fmt,data,reason", [
    ("mp4", b"", "empty"),
    ("mp4", b"\x00" * 500, "corrupt"),
    ("jpeg", b"not a jpeg at all", "corrupt"),
    ("gif", b"GIF89a-broken", "corrupt"),
])
def test_bad_media_reasons(fmt, data, reason):
  with pytest.raises(media.BadSample) as e:
    media.decode(data, fmt, 4, "middle", None)
  assert e.value.reason == reason


def test_truncated_media(numbered_mp4):
  with pytest.raises(media.BadSample) as e:
    media.decode(numbered_mp4[: len(numbered_mp4) // 2], "mp4", 16, "middle", None)
  assert e.value.reason in ("truncated", "corrupt")
  jpeg = demo.encode_jpeg(np.full((64, 64, 3), 100, np.uint8))
  with pytest.raises(media.BadSample) as e:
    media.decode(jpeg[: len(jpeg) // 2], "jpeg", 1, "middle", None)
  assert e.value.reason == "truncated"


# ---- transforms ---------------------------------------------------------------------


@pytest.mark.parametrize("out", [(24, 24), (80, 100), (37, 53)])
def test_resize_matches_torch(out):
  torch = pytest.importorskip("torch")
  import torch.nn.functional as F

  x = np.random.default_rng(0).integers(0, 256, (2, 37, 53, 3)).astype(np.uint8)
  t = torch.from_numpy(x).permute(0, 3, 1, 2).float()
  ref = F.interpolate(t, size=out, mode="bicubic").long().permute(0, 2, 3, 1).numpy()
  got = media.resize_bicubic_trunc(x, *out)
  # float32 summation order: a value on an integer boundary may truncate differently.
  assert np.abs(got - ref).max() <= 1 and (got != ref).mean() < 1e-3
  assert got.min() < 0 or got.max() > 255 or out == (37, 53)  # no clamping
  ref = F.interpolate(t, size=out, mode="nearest").long().permute(0, 2, 3, 1).numpy()
  np.testing.assert_array_equal(media.eval_transform(x, out[0]) if out[0] == out[1]
                                else media.resize_nearest(x, *out), ref)


def test_train_transform_deterministic_and_consistent():
  clip = demo.render_clip(np.random.default_rng(0), "red", "circle", "left", 64, 4)
  a = media.train_transform(clip, 32, np.random.default_rng(5))
  b = media.train_transform(clip, 32, np.random.default_rng(5))
  np.testing.assert_array_equal(a, b)
  assert a.shape == (4, 32, 32, 3)
  # One crop/flip/augmentation for the whole clip: identical frames stay identical.
  still = np.repeat(clip[:1], 3, axis=0)
  out = media.train_transform(still, 32, np.random.default_rng(1))
  assert (out == out[0]).all()
  norm = media.normalize(np.full((1, 2, 2, 3), 255, np.uint8))
  np.testing.assert_allclose(norm[0, 0, 0], (1 - media.CLIP_MEAN) / media.CLIP_STD, rtol=1e-6)


def test_randaugment_ops_are_distinct():
  rng = np.random.default_rng(0)
  for _ in range(50):
    ops = rng.choice(len(media.RANDAUG_OPS), size=2, replace=False)
    assert ops[0] != ops[1]
  frame = np.zeros((16, 16, 3), np.uint8) + 200
  shifted = media._affine(frame, "TranslateX")
  assert (shifted[:, :5] == 128).all() and (shifted[:, 6:] == 200).all()
