"""Video input: decoding (PyAV, seeking), clip sampling, spatial ops, test views, skip reasons,
tar / table sources through the binding pipeline (big_mm/input/video.py)."""
import io
import json
import os
import tarfile

import av
import numpy as np
import pytest
from PIL import Image

from big_mm import config as config_lib
from big_mm.input import pipeline, preprocess, video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "data", "digits_spm.model")


def _frames(n, size=32):
  """uint8 [n, size, size, 3]: frame i has red = 3 i mod 256 and a fixed pattern."""
  x = np.zeros((n, size, size, 3), np.uint8)
  x[..., 0] = (3 * np.arange(n) % 256)[:, None, None]
  x[:, : size // 4, : size // 2, 1] = 255
  return x


def _encode(frames, fmt="mp4", codec="libx264", gop=10, fps=25) -> bytes:
  buf = io.BytesIO()
  with av.open(buf, "w", format=fmt) as c:
    s = c.add_stream(codec, rate=fps)
    s.height, s.width = frames.shape[1:3]
    s.pix_fmt = "yuv420p"
    s.codec_context.gop_size = gop
    if codec == "libx264":
      s.options = {"preset": "ultrafast", "crf": "10"}
    for f in frames:
      for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  return buf.getvalue()


def _decode_all(data: bytes) -> np.ndarray:
  with av.open(io.BytesIO(data)) as c:
    return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _png(frame) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(frame).save(buf, format="PNG")
  return buf.getvalue()


def _pp(pp, value, seed=0):
  return preprocess.apply_pp(preprocess.parse_pp(pp, video.VIDEO), value,
                             np.random.default_rng(seed))


# ---- sampling ----------------------------------------------------------------------------

def test_clip_indices_of_each_mode():
  idx = lambda mode, n=20, **kw: video.clip_indices(n, 4, mode=mode, **kw).tolist()
  assert idx("center", stride=2) == [[6, 8, 10, 12]]  # span 7, start (20 - 7) // 2
  assert idx("center", stride=2, clips=3) == [[0, 2, 4, 6], [6, 8, 10, 12], [13, 15, 17, 19]]
  assert idx("uniform") == [[0, 6, 13, 19]]  # round(linspace(0, 19, 4))
  assert idx("segment_center") == [[2, 7, 12, 17]]  # segments of 5, centres
  assert idx("segment_center", clips=2) == [[1, 6, 11, 16], [3, 8, 13, 18]]
  rng = lambda seed: np.random.default_rng(seed)
  for mode in ("random", "segment"):
    a = video.clip_indices(100, 8, 3 if mode == "random" else 1, mode, rng(0), clips=2)
    b = video.clip_indices(100, 8, 3 if mode == "random" else 1, mode, rng(0), clips=2)
    np.testing.assert_array_equal(a, b)  # Deterministic given the rng.
    draws = {tuple(video.clip_indices(100, 8, 1, mode, rng(s))[0]) for s in range(10)}
    assert len(draws) > 5
  random = video.clip_indices(100, 8, 3, "random", rng(1), clips=50)
  assert (np.diff(random, axis=1) == 3).all() and random.min() >= 0 and random.max() <= 99
  assert len(set(random[:, 0])) > 20  # Random starts over 0 .. 100 - 22.
  seg = video.clip_indices(100, 4, 1, "segment", rng(2), clips=50)
  assert all(((25 * k <= seg[:, k]) & (seg[:, k] < 25 * (k + 1))).all() for k in range(4))


def test_short_video_rules():
  assert video.clip_indices(5, 4, 2, "center", short="repeat_last").tolist() == [[0, 2, 4, 4]]
  assert video.clip_indices(5, 4, 2, "random", np.random.default_rng(0),
                            short="loop").tolist() == [[0, 2, 4, 1]]
  assert video.clip_indices(3, 6, 1, "uniform").tolist() == [[0, 0, 1, 1, 2, 2]]
  for mode in ("center", "uniform", "segment_center"):
    with pytest.raises(preprocess.BadRecord) as e:
      video.clip_indices(3, 6, 1, mode, short="skip")
    assert e.value.reason == "video_too_short"
  with pytest.raises(preprocess.BadRecord, match="video_too_short"):  # Through the op.
    _pp("decode_video|sample_clip(8, 2, short='skip')", _frames(10))
  clip = _pp("decode_video|sample_clip(8, 2, 'center')", _frames(10))
  np.testing.assert_array_equal(clip, _frames(10)[[0, 2, 4, 6, 8, 9, 9, 9]])


# ---- decoding ----------------------------------------------------------------------------

def test_seeking_decodes_only_the_needed_frames():
  """A late clip in a 300-frame video (keyframe every 10) decodes its span plus at most one
  GOP, and the frames equal those of a full sequential decode."""
  data = _encode(_frames(300), gop=10)
  full = _decode_all(data)
  v = video.open_video(data)
  assert (v.num_frames, v.fps, v.decoded) == (300, 25.0, 0)  # Opening decodes nothing.
  idx = [283, 285, 287, 289, 291, 293]
  np.testing.assert_array_equal(v.read(idx), full[idx])
  assert v.decoded <= 11 + 10  # The span 283..293, from keyframe 280.
  v = video.open_video(data)  # Sparse frames: a seek for each keyframe interval.
  idx = [5, 150, 151, 295, 1]
  np.testing.assert_array_equal(v.read(idx), full[idx])
  assert v.decoded <= 6 + 2 + 6
  v.close()
  for fmt, codec in (("matroska", "ffv1"), ("webm", "libvpx"), ("avi", "mpeg4")):
    data = _encode(_frames(40), fmt=fmt, codec=codec, gop=8)
    v = video.open_video(data)
    np.testing.assert_array_equal(v.read([35, 3, 20]), _decode_all(data)[[35, 3, 20]])
    assert v.num_frames == 40 and v.decoded < 40


def test_every_input_form_gives_the_same_clip(tmp_path):
  frames = _frames(12, 16)
  pp = "decode_video|sample_clip(3, 4, 'center')"
  expect = frames[[1, 5, 9]]  # The central span of 9 frames.
  folder = tmp_path / "frames"
  folder.mkdir()
  for i, f in enumerate(frames):
    Image.fromarray(f).save(folder / f"{i:04d}.png")
  pngs = [_png(f) for f in frames]
  for value in (frames, pngs, np.array(pngs, dtype=object), str(folder),
                [str(folder / f"{i:04d}.png") for i in range(12)]):
    np.testing.assert_array_equal(_pp(pp, value), expect)
  v = video.open_video(pngs)
  v.read([3, 3, 5])
  assert v.decoded == 2  # Only the needed images are decoded.
  data = _encode(frames)
  (tmp_path / "clip.mp4").write_bytes(data)
  for value in (data, str(tmp_path / "clip.mp4"), np.array(data, dtype=object)):
    clip = _pp(pp, value)
    assert clip.shape == (3, 16, 16, 3) and clip.dtype == np.uint8
    assert np.abs(clip[..., 0].astype(int) - expect[..., 0]).mean() < 3  # Lossy, close.


# ---- spatial ops, views, shapes ----------------------------------------------------------

def test_spatial_ops_are_identical_on_every_frame():
  rng = np.random.default_rng(0)
  base = rng.integers(0, 200, (24, 32, 3), dtype=np.uint8)
  ramp = base[None] + np.arange(6, dtype=np.uint8)[:, None, None, None]  # frame i: base + i
  crops = set()
  for seed in range(6):
    out = _pp("decode_video|sample_clip(6, 1, 'center')|video_random_crop(12)|video_flip_lr",
              ramp, seed).astype(int)
    np.testing.assert_array_equal(out - out[0], np.arange(6)[:, None, None, None] + 0 * out)
    crops.add(out[0].tobytes())
  assert len(crops) > 3  # The window and flip are random, one draw per clip.
  static = np.repeat(base[None], 5, axis=0)
  pp = ("decode_video|sample_clip(5)|video_inception_crop(10)|video_flip_lr|"
        "video_normalize('imagenet')")
  outs = [_pp(pp, static, seed) for seed in range(4)]
  for out in outs:
    assert out.shape == (5, 10, 10, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.broadcast_to(out[0], out.shape))
  assert not np.allclose(outs[0], outs[1])


def test_views_and_output_shapes():
  x = np.zeros((20, 24, 40, 3), np.uint8)
  x[..., 0] = np.arange(40, dtype=np.uint8)  # Red = column.
  x[..., 1] = (np.arange(20, dtype=np.uint8) * 10)[:, None, None]  # Green = 10 * frame.
  pp = ("decode_video|sample_clip(4, 2, 'center', clips=2)|video_resize_small(24)|"
        "video_views(3, 24)")
  out = _pp(pp, x)
  assert out.shape == preprocess.output_shape(pp) == (6, 4, 24, 24, 3)
  assert out[:, 0, 0, 0, 0].tolist() == [0, 8, 16] * 2  # Left / centre / right crops.
  assert out[::3, :, 0, 0, 1].tolist() == [[0, 20, 40, 60], [130, 150, 170, 190]]  # Clips.
  shapes = {
      "decode_video|sample_clip(8)|video_inception_crop(16)|video_value_range(-1, 1)":
          (8, 16, 16, 3),
      "decode_video|sample_clip(8, clips=3)|video_resize((12, 20))": (3, 8, 12, 20, 3),
      "decode_video|sample_clip(8)|video_central_crop(10)|video_views(1, 8)": (1, 8, 8, 8, 3),
      "decode_video|sample_clip(8)|video_resize(16)|video_resize_small(8)": None,
      "decode_video|sample_clip(8)": None,
      "decode_video|video_random_crop(8)": None,
  }
  for pp, shape in shapes.items():
    assert preprocess.output_shape(pp) == shape, pp
  assert preprocess.output_shape("log_mel(100, 64)") == (100, 64)  # Non-composing ops.
  with pytest.raises(ValueError, match="needs decoded frames.*sample_clip"):
    _pp("decode_video|video_flip_lr", x)
  with pytest.raises(ValueError, match="mode must be one of"):
    preprocess.parse_pp("sample_clip(8, mode='middle')")
  with pytest.raises(ValueError, match="stride must be 1"):
    preprocess.parse_pp("sample_clip(8, 2, 'uniform')")


# ---- skip reasons ------------------------------------------------------------------------

def test_every_skip_reason(tmp_path):
  mp4 = _encode(_frames(50), gop=10)
  mkv = _encode(_frames(50), fmt="matroska", codec="ffv1", gop=10)
  short = "decode_video|sample_clip(8, 10, short='skip')"
  cases = [
      (b"", "decode_video", "empty_video"),
      (np.zeros((0, 8, 8, 3), np.uint8), "decode_video", "empty_video"),
      ([], "decode_video", "empty_video"),
      (b"not a video at all" * 20, "decode_video", "corrupt_video"),
      (mp4[: len(mp4) // 2], "decode_video", "corrupt_video"),  # Index (moov) cut off.
      (mkv[: len(mkv) // 2], "decode_video|sample_clip(4, 1, 'uniform')", "corrupt_video"),
      (np.zeros((4, 8, 8, 3), np.float32), "decode_video", "corrupt_video"),
      (np.zeros((8, 8, 3), np.uint8), "decode_video", "corrupt_video"),  # An image.
      ([_png(_frames(1)[0]), b"junk"], "decode_video|sample_clip(2)", "corrupt_video"),
      (str(tmp_path / "missing.mp4"), "decode_video", "read"),
      (mp4, short, "video_too_short"),
      (mp4, "decode_video(max_seconds=1)", "video_too_long"),  # 50 frames at 25 fps: 2 s.
      (mp4, "decode_video(max_frames=40)", "video_too_long"),
      (_frames(50), "decode_video(max_frames=40)", "video_too_long"),
      (mp4, "decode_video|sample_clip(4)|video_central_crop(64)", "too_small"),
  ]
  for value, pp, reason in cases:
    with pytest.raises(preprocess.BadRecord) as e:
      _pp(pp, value)
    assert e.value.reason == reason, (pp, reason, str(e.value))
  assert _pp("decode_video(max_seconds=2.5, max_frames=50)|sample_clip(4)", mp4).shape == (
      4, 32, 32, 3)


# ---- sources and the pipeline (binding mode) ---------------------------------------------

def test_tar_and_table_sources_through_the_pipeline(tmp_path):
  """Video-text tar shards and jsonl tables with file paths: batch["video"] [B, T, S, S, 3];
  a corrupt video is skipped and counted; a caption without a video is present text only."""
  rng = np.random.default_rng(0)
  good = [_encode(rng.integers(0, 255, (12, 24, 32, 3), dtype=np.uint8)) for _ in range(3)]
  shard = tmp_path / "shard.tar"
  with tarfile.open(shard, "w") as tar:  # 001's video is broken, 005 has only a caption.
    for i in range(6):
      members = [(f"{i:03d}.mp4", b"broken" if i == 1 else good[i % 3])] if i < 5 else []
      for name, data in members + [(f"{i:03d}.txt", f"clip {i}".encode())]:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  paths = []
  for i, data in enumerate(good):
    (tmp_path / f"v{i}.mp4").write_bytes(data)
    paths.append(str(tmp_path / f"v{i}.mp4"))
  with open(tmp_path / "clips.jsonl", "w") as f:
    for i in range(6):
      f.write(json.dumps({"video": paths[i % 3] if i != 4 else str(tmp_path / "no.mp4"),
                          "text": f"clip {i}"}) + "\n")
  pp_video = "decode_video|sample_clip(4, 2)|video_inception_crop(16)|video_value_range(-1, 1)"
  for data, bad in ((f"tar:{shard}", "corrupt_video"), (f"jsonl:{tmp_path}/clips.jsonl", "read")):
    cfg = dict(data=data, split="train", tokenizer=TOKENIZER, text_len=6, num_workers=0,
               prefetch=1, pp_image="decode|resize(8)", modalities=("video", "text"),
               pp_modalities={"video": pp_video})
    it = pipeline.make_train_iterator(cfg, global_batch_size=4, seed=0, sharding=None)
    present = []
    for _ in range(3):
      b = next(it)
      assert b["video"].shape == (4, 4, 16, 16, 3) and b["video"].dtype == np.float32
      assert b["text"].shape == (4, 6) and b["text_present"].all()
      present += b["video_present"].tolist()
      v = b["video"][b["video_present"] == 1]
      assert -1 <= v.min() < 0 < v.max() <= 1
      assert not b["video"][b["video_present"] == 0].any()
    it.close()
    assert sum(present) > 6
    assert it.stats()[f"skipped/{bad}"] >= 1, (data, it.stats())
    if data.startswith("tar"):
      assert 0 in present  # Key 005 has a caption but no video.
      batches = list(pipeline.make_eval_batches(cfg, "test", 4, None))  # Every record once.
      assert all(b["video"].shape == (4, 4, 16, 16, 3) for b in batches)
      assert sum(b["mask"].sum() for b in batches) == 5  # Record 001 is corrupt.
      assert sum(b["video_present"].sum() for b in batches) == 4


def test_config_checks_the_video_pp():
  ok = {"input.modalities": ("video", "text"),
        "input.pp_modalities": {"video": "decode_video|sample_clip(4)|video_central_crop(16)"}}
  assert config_lib.load("configs/demo.py", ok).input.modalities == ("video", "text")
  with pytest.raises(config_lib.ConfigError, match="does not fix the example shape"):
    config_lib.load("configs/demo.py", {**ok, "input.pp_modalities": {
        "video": "decode_video|sample_clip(4)"}})
