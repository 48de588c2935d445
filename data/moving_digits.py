"""`moving_digits`: captioned 16-frame clips of scikit-learn's digits moving, bouncing, rotating
or following one another on a 32x32 canvas, where no single frame determines the caption.

Each clip shows a digit image of `digits_captions` (the same 8x8 scans, upsampled bilinearly to
DIGIT_SIZE pixels, white on black) in one of 8 motion classes (`label`, names LABELS):

  0 left / 1 right       slides horizontally (10-18 px over the clip)
  2 up / 3 down          slides vertically
  4 clockwise / 5 anticlockwise   turns 120-240 degrees about a point near the centre
  6 bouncing             moves to an edge, bounces back (horizontally or vertically)
  7 in turn              one digit, then another one (a different digit) in its place

The classes come in time-reversed pairs: a clip of `left` played backwards is a clip of
`right` with the same draws (`draw_path`), up/down and clockwise/anticlockwise likewise,
and each pair's draws are symmetric, so both classes show the same distribution of single
frames; a reversed `bouncing` clip is another bouncing clip, and a reversed `in turn` clip
shows the two digits in the other order (the caption says which came first). So the motion
(and the order) is only visible across frames: a frame-average model cannot tell the pairs
apart. The digit itself is visible in any frame.

Fields: video (mp4 bytes: 16 frames at FPS, 32x32, H.264 yuv420p, QP 18; see `to_mp4`), text
(a caption from CAPTION_TEMPLATES[label], e.g. "a 3 moving to the left", "the 7 appears
after the 2"), label (0-7), digits (int32 [2]: the digit(s) shown, in order; -1 = none),
image_ids (int32 [2]: their rows in sklearn's data; -1 = none), id. Splits: `train`
(SPLITS["train"] clips) uses only `digits_captions`' train images, `test` only its 300 test
images (held-out digit images, `digits_captions.split_ids`). Record r has label r % 8 and is
a pure function of (seed, split, r). The zero-shot prompts, ZEROSHOT_TEMPLATES x CLASS_NAMES
("a video of a digit moving left", ...), are never a caption.

Encoding (measured on 200 test clips, PyAV 18.1 / libx264): constant quantiser 18 decodes to a
mean absolute error of 0.34 / 255 per pixel (worst clip 0.44; the digits are grey, so 4:2:0
chroma subsampling loses nothing) at 2.9 KB per clip. CRF 18 (0.47 / 255, 2.8 KB) is not
used: under CPU load about 1 encode in 3,000 came out different (its rate control diverged
mid-clip); 9,000 loaded QP 18 encodes all gave the same bytes. x264's lossless mode (qp 0)
takes 4.2 KB and still errs by 0.07 / 255 (the RGB -> limited-range YUV conversion). Build
with `python data/build_demo.py --video [--data_dir DIR]` or `build(data_dir)`: 4,000 + 800
clips, ~20 s on 2 cores, 9.9 MB of array_record.
"""
from __future__ import annotations

import concurrent.futures
import fractions
import functools
import io
import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data import digits_captions

SEED = 0
NUM_FRAMES = 16
CANVAS = 32
DIGIT_SIZE = 14
FPS = 8
QP = 18
SPLITS = {"train": 4000, "test": 800}

LABELS = ("left", "right", "up", "down", "clockwise", "anticlockwise", "bouncing", "in turn")
LEFT, RIGHT, UP, DOWN, CLOCKWISE, ANTICLOCKWISE, BOUNCING, IN_TURN = range(len(LABELS))
# The class a reversed clip belongs to (in turn: the same class, the digits swapped).
REVERSED = {LEFT: RIGHT, RIGHT: LEFT, UP: DOWN, DOWN: UP, CLOCKWISE: ANTICLOCKWISE,
            ANTICLOCKWISE: CLOCKWISE, BOUNCING: BOUNCING, IN_TURN: IN_TURN}
# "{n}" / "{w}": the (first) digit as a numeral / word; "{n2}" / "{w2}": the second one.
CAPTION_TEMPLATES = (
    ("a {n} moving to the left", "the digit {n} slides left", "a handwritten {w} drifting "
     "leftwards", "a {w} travelling from right to left"),
    ("a {n} moving to the right", "the digit {n} slides right", "a handwritten {w} drifting "
     "rightwards", "a {w} travelling from left to right"),
    ("a {n} moving up", "the digit {n} rises", "a handwritten {w} drifting upwards",
     "a {w} travelling from bottom to top"),
    ("a {n} moving down", "the digit {n} sinks", "a handwritten {w} drifting downwards",
     "a {w} travelling from top to bottom"),
    ("a {n} rotating clockwise", "the digit {n} turns clockwise",
     "a handwritten {w} spinning clockwise", "a {w} turning the way a clock's hands go"),
    ("a {n} rotating anticlockwise", "the digit {n} turns counterclockwise",
     "a handwritten {w} spinning anticlockwise", "a {w} turning against a clock's hands"),
    ("a {n} bouncing off the edge", "the digit {n} bounces back",
     "a handwritten {w} hitting the wall and coming back", "a {w} bouncing"),
    ("the {n2} appears after the {n}", "a {n} and then a {n2}", "first a {w}, then a {w2}",
     "the {w} turns into a {w2}"),
)
# Zero-shot prompts (ZEROSHOT_TEMPLATES x CLASS_NAMES): in no caption.
CLASS_NAMES = ("moving left", "moving right", "moving up", "moving down", "turning clockwise",
               "turning anticlockwise", "bouncing", "changing into another digit")
ZEROSHOT_TEMPLATES = ("a video of a digit {}", "a short clip of a number {}")
_SPLIT_INDEX = {"train": 0, "test": 1}
_LO, _HI = DIGIT_SIZE / 2, CANVAS - DIGIT_SIZE / 2  # Digit centres that keep it on the canvas.


def digit_image(digit: np.ndarray) -> np.ndarray:
  """An 8x8 sklearn digit (0..16) -> uint8 [DIGIT_SIZE, DIGIT_SIZE], as digits_captions
  upsamples it."""
  png = digits_captions.to_png(digit, size=DIGIT_SIZE)
  return np.asarray(Image.open(io.BytesIO(png)))[..., 0]


def render(image: np.ndarray, x: float, y: float, angle: float) -> np.ndarray:
  """`image` (uint8 [S, S]) centred at (x, y) on a black CANVAS^2 frame, turned `angle`
  degrees clockwise (bilinear) -> uint8 [CANVAS, CANVAS]."""
  # A black border: PIL fills output points that map outside the input rather than
  # interpolating towards black, which would make the digit's edge flicker as it moves.
  image = np.pad(image, 2)
  s = image.shape[0] / 2
  c, n = np.cos(np.radians(angle)), np.sin(np.radians(angle))
  # PIL maps each output point to an input point: the inverse rotation about (x, y).
  coeffs = (c, n, s - c * x - n * y, -n, c, s + n * x - c * y)
  out = Image.fromarray(image).transform((CANVAS, CANVAS), Image.AFFINE, coeffs,
                                         resample=Image.BILINEAR, fillcolor=0)
  return np.asarray(out)


def draw_path(label: int, rng: np.random.Generator) -> np.ndarray:
  """A clip of class `label` as float [NUM_FRAMES, 4] rows (image slot, x, y, clockwise
  angle). A label and REVERSED[label] make the same draws from `rng` and get reversed paths
  (bouncing: itself reversed is another bouncing path). `in turn` shows slot 0 for frames
  < k, slot 1 after, k uniform in 5..11: its reversal (slots swapped, k -> 16 - k) is as
  likely."""
  kind = min(label, REVERSED[label])
  t = np.arange(NUM_FRAMES, dtype=np.float64)
  path = np.zeros((NUM_FRAMES, 4))
  if kind in (LEFT, UP):
    a, b = rng.uniform(_LO, _LO + 4), rng.uniform(_HI - 4, _HI)
    axis = 1 if kind == LEFT else 2
    path[:, axis] = b + (a - b) * t / (NUM_FRAMES - 1)
    path[:, 3 - axis] = rng.uniform(_LO + 2, _HI - 2)
  elif kind == CLOCKWISE:
    mid, sweep = rng.uniform(-30, 30), rng.uniform(120, 240)
    path[:, 1:3] = rng.uniform(CANVAS / 2 - 3, CANVAS / 2 + 3, 2)
    path[:, 3] = mid - sweep / 2 + sweep * t / (NUM_FRAMES - 1)
  elif kind == BOUNCING:
    axis, wall = 1 + int(rng.integers(2)), (_LO, _HI)[int(rng.integers(2))]
    k, speed = int(rng.integers(4, 12)), rng.uniform(1.0, 1.5)
    path[:, axis] = wall + np.sign(CANVAS / 2 - wall) * speed * np.abs(t - k)
    path[:, 3 - axis] = rng.uniform(_LO + 2, _HI - 2)
  else:  # IN_TURN
    path[:, 0] = t >= int(rng.integers(5, 12))
    path[:, 1:3] = rng.uniform(CANVAS / 2 - 4, CANVAS / 2 + 4, 2)
  return path if label == kind else path[::-1]


def clip_frames(path: np.ndarray, images) -> np.ndarray:
  """Renders `path` (draw_path's rows) with `images` (uint8 [S, S] each, indexed by the
  slot) -> uint8 [NUM_FRAMES, CANVAS, CANVAS, 3]."""
  grey = np.stack([render(images[int(slot)], x, y, angle) for slot, x, y, angle in path])
  return np.repeat(grey[..., None], 3, axis=-1)


def to_mp4(frames: np.ndarray, fps: int = FPS, qp: int = QP) -> bytes:
  """uint8 [T, H, W, 3] (H, W even) -> mp4 bytes: H.264 (libx264), yuv420p, constant
  quantiser `qp` (0 = lossless), one thread."""
  import av  # pylint: disable=g-import-not-at-top
  frames = np.asarray(frames, np.uint8)
  buf = io.BytesIO()
  with av.open(buf, "w", format="mp4") as container:
    stream = container.add_stream("libx264", rate=fractions.Fraction(fps))
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    stream.options = {"qp": str(qp), "threads": "1"}
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())
  return buf.getvalue()


def decode(video) -> np.ndarray:
  """Encoded video bytes or a path -> every frame, uint8 [T, H, W, 3] (for checks: the
  training pipeline decodes with big_mm/input/video.py)."""
  import av  # pylint: disable=g-import-not-at-top
  src = io.BytesIO(video) if isinstance(video, bytes) else video
  with av.open(src) as container:
    return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def caption(label: int, digits, rng: np.random.Generator) -> str:
  """A caption of class `label` about `digits` (1 or 2 ints), the template drawn from `rng`."""
  templates = CAPTION_TEMPLATES[label]
  names = {"n": digits[0], "w": digits_captions.WORDS[digits[0]]}
  if len(digits) > 1:
    names.update(n2=digits[1], w2=digits_captions.WORDS[digits[1]])
  return templates[int(rng.integers(len(templates)))].format(**names)


@functools.lru_cache(maxsize=4)
def _digits(split: str, seed: int):
  """(images [n, 8, 8], labels [n], the split's ids) of sklearn's digits."""
  images, labels = digits_captions.load_digits()
  return images, labels, digits_captions.split_ids(labels, seed)[_SPLIT_INDEX[split]]


def plan(split: str, index: int, seed: int = SEED):
  """Record `index` of `split` without its video: (label, image_ids, digits, text, path)."""
  _, labels, ids = _digits(split, seed)
  rng = np.random.default_rng([seed, _SPLIT_INDEX[split], index])
  label = index % len(LABELS)
  first = int(ids[rng.integers(len(ids))])
  image_ids = [first]
  if label == IN_TURN:
    others = ids[labels[ids] != labels[first]]
    image_ids.append(int(others[rng.integers(len(others))]))
  digits = [int(labels[i]) for i in image_ids]
  return label, image_ids, digits, caption(label, digits, rng), draw_path(label, rng)


def example(split: str, index: int, seed: int = SEED) -> dict:
  """Record `index` of `split` (a pure function of its arguments)."""
  images = _digits(split, seed)[0]
  label, image_ids, digits, text, path = plan(split, index, seed)
  frames = clip_frames(path, [digit_image(images[i]) for i in image_ids])
  pad = [-1] * (2 - len(image_ids))
  offset = 0 if split == "train" else 1_000_000  # Test ids never meet train ones.
  return {"video": to_mp4(frames), "text": text, "label": label,
          "digits": np.asarray(digits + pad, np.int32),
          "image_ids": np.asarray(image_ids + pad, np.int32), "id": offset + index}


def generate(split: str, seed: int = SEED, size: int | None = None, workers: int | None = None):
  """Yields (key, example) of `split` in record order (size: the first records only),
  rendered and encoded by `workers` threads (default: the CPU count)."""
  n = SPLITS[split] if size is None else size
  with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
    for ex in pool.map(lambda i: example(split, i, seed), range(n)):
      yield ex["id"], ex


class MovingDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn digits moving, rotating, bouncing or in turn, with motion captions."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, *, sizes: dict[str, int] | None = None, **kwargs):
    self.sizes = sizes or SPLITS
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
                                          doc=f"mp4 bytes: {NUM_FRAMES} frames, "
                                              f"{CANVAS}x{CANVAS}, H.264"),
            "text": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=list(LABELS)),
            "digits": tfds.features.Tensor(shape=(2,), dtype=np.int32),
            "image_ids": tfds.features.Tensor(shape=(2,), dtype=np.int32),
            "id": np.int32}),
        homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html")

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the digits ship with scikit-learn.
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    yield from generate(split, size=self.sizes[split])


def build(data_dir: str | None = None, sizes: dict[str, int] | None = None
          ) -> tfds.core.DatasetBuilder:
  """Builds (if needed) and returns moving_digits; sizes: {split: n}, a small build."""
  builder = MovingDigits(data_dir=data_dir, file_format="array_record", sizes=sizes)
  with digits_captions.deterministic_serialization():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def train_tokenizer(out: str) -> str:
  """Trains the tokenizer of the video demos (make_tokenizer.DEMO_SETTINGS, 224 pieces: every
  word whole) on every caption template with every digit and the zero-shot prompts; -> its
  path."""
  from tools import make_tokenizer  # pylint: disable=g-import-not-at-top
  texts = [t.format(n=n, w=w, n2=(n + 1) % 10, w2=digits_captions.WORDS[(n + 1) % 10])
           for per_class in CAPTION_TEMPLATES for t in per_class
           for n, w in enumerate(digits_captions.WORDS)]
  texts += [t.format(c) for t in ZEROSHOT_TEMPLATES for c in CLASS_NAMES] * 10  # As common.
  return make_tokenizer.train(texts, out, **dict(make_tokenizer.DEMO_SETTINGS, vocab_size=224))
