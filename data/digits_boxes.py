"""`digits_boxes`: scikit-learn digits at random places and scales on a canvas, with their
boxes and referring expressions (SigLIP 2's LocCa: captioning, referring expressions
text -> box, grounded captions box -> text).

Each 48x48 RGB canvas (black) holds 2 or 3 digits (each 8x8 digit upsampled bilinearly to a
SIDE_MIN..SIDE_MAX px square), not overlapping (at least 1 px apart) and with box centres at
least MIN_DX px apart horizontally, so "left of" is never ambiguous. About a third of the
3-digit canvases repeat a digit class (two different images of it), so some referring
expressions need a position word.
Fields:
  image       PNG bytes
  text        the caption, naming the digits from left to right, always with a direction
              ("3, 7 and 1 from left to right", ...: CAPTION_TEMPLATES), so that the
              pipeline's flip rule (big_mm/input/boxes.py: left <-> right in the texts of a
              flipped image) keeps it true
  boxes       float32 [n, 4] (ymin, xmin, ymax, xmax) normalised to [0, 1]: each digit's
              square cell (a TFDS Tensor of shape (None, 4)); pixel row i covers [i/48, (i+1)/48]
  box_texts   one referring expression per box, naming it alone: "the 7" / "the digit seven"
              when its class is unique on the canvas; else "the 3 on the left" / "the leftmost
              3" (two of them) or "the leftmost 3" / "the 3 in the middle" / "the rightmost 3"
  box_labels  the digit class of each box
  digit_ids   the scikit-learn row (digits_captions' id) of each box's digit
  id          the example's index in its split
Boxes, box_texts, box_labels and digit_ids are in left-to-right order (by box centre). Splits: `train`
(NUM_EXAMPLES["train"] canvases of digits_captions' train images) and `test` (of its test
images), so no digit image is in both. Deterministic from SEED.

Chance level of referring (IoU >= 0.5 with the true box), measured over the test split's 2,542
boxes by `chance_levels` (numpy): a uniformly random one of the canvas's own boxes 39.7% (an
oracle that knows every box but not which one is meant); the best single fixed box (of a 2-px
grid of 16-48 px squares, chosen on the test split itself) 9.1%; a box of a true digit's size
at a uniformly random place 3.1%.

The tokenizer data/digits_boxes_spm.model (`train_tokenizer`) is trained on the train
captions and box texts (digits_pairs_spm lacks "leftmost", "middle", ...); with it a box text
is at most 10 pieces and a caption 11 (so box_text_len >= 11 and text_len >= 12 keep them
whole, EOS included). Build with
`python data/build_demo.py [--data_dir DIR]` (TF-free, deterministic).
"""
from __future__ import annotations

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data import digits_captions

SEED = 2
IMAGE_SIZE = 48
SIDE_MIN, SIDE_MAX = 12, 24
MIN_DX = 6  # Least horizontal distance of two box centres (pixels).
NUM_EXAMPLES = {"train": 12_000, "test": 1_000}
WORDS = digits_captions.WORDS

# "{digits}": the digits from left to right ("3, 7 and 1").
CAPTION_TEMPLATES = (
    "{digits} from left to right",
    "from left to right the digits {digits}",
    "handwritten {digits} reading from left to right",
    "left to right: {digits}",
)
# A box whose class is unique on the canvas; "{d}" the digit (numeral or word).
UNIQUE_TEMPLATES = ("the {d}", "the digit {d}")
# A class twice: "{side}" left / right.
TWO_TEMPLATES = ("the {d} on the {side}", "the {side}most {d}")
# A class three times: by position from the left.
THREE_EXPRESSIONS = ("the leftmost {d}", "the {d} in the middle", "the rightmost {d}")


def _digit_word(d: int, rng: np.random.Generator) -> str:
  return WORDS[d] if rng.integers(2) else str(d)


def _join(words: list[str]) -> str:
  return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def caption(labels: list[int], rng: np.random.Generator) -> str:
  """The caption of digits `labels` (in left-to-right order)."""
  template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
  return template.format(digits=_join([_digit_word(d, rng) for d in labels]))


def referring_expressions(labels: list[int], rng: np.random.Generator) -> list[str]:
  """One expression per digit (labels in left-to-right order) that names it alone."""
  out = []
  for i, d in enumerate(labels):
    same = [j for j, e in enumerate(labels) if e == d]
    word = _digit_word(d, rng)
    if len(same) == 1:
      out.append(UNIQUE_TEMPLATES[int(rng.integers(len(UNIQUE_TEMPLATES)))].format(d=word))
    elif len(same) == 2:
      side = "left" if same.index(i) == 0 else "right"
      template = TWO_TEMPLATES[int(rng.integers(len(TWO_TEMPLATES)))]
      out.append(template.format(d=word, side=side))
    else:
      out.append(THREE_EXPRESSIONS[same.index(i)].format(d=word))
  return out


def _place(sides: list[int], rng: np.random.Generator) -> list[tuple[int, int]] | None:
  """(top, left) of squares of `sides` inside the canvas, 1 px apart, centres MIN_DX apart
  horizontally; None if random tries fail."""
  placed = []
  for side in sides:
    for _ in range(100):
      top, left = (int(v) for v in rng.integers(IMAGE_SIZE - side + 1, size=2))
      ok = all((top + side + 1 <= t or t + s + 1 <= top or left + side + 1 <= l
                or l + s + 1 <= left) and abs((2 * left + side) - (2 * l + s)) >= 2 * MIN_DX
               for (t, l), s in zip(placed, sides))
      if ok:
        placed.append((top, left))
        break
    else:
      return None
  return placed


def render(digits: list[np.ndarray], cells: list[tuple[int, int, int]]) -> np.ndarray:
  """8x8 digits (0..16) at (top, left, side) cells -> uint8 [48, 48] canvas."""
  canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
  for digit, (top, left, side) in zip(digits, cells):
    grey = np.clip(np.round(np.asarray(digit, np.float64) * (255.0 / 16.0)), 0, 255)
    img = Image.fromarray(grey.astype(np.uint8), mode="L").resize((side, side), Image.BILINEAR)
    canvas[top:top + side, left:left + side] = np.asarray(img)
  return canvas


def generate(split: str, seed: int = SEED):
  """Yields (key, example) for `split` (see the module docstring)."""
  images, labels = digits_captions.load_digits()
  ids = dict(zip(("train", "test"), digits_captions.split_ids(labels)))[split]
  by_digit = [ids[labels[ids] == d] for d in range(10)]
  rng = np.random.default_rng([seed, 0 if split == "train" else 1])
  for example_id in range(NUM_EXAMPLES[split]):
    n = int(rng.integers(2, 4))
    classes = [int(c) for c in rng.integers(10, size=n)]
    if n == 3 and rng.random() < 1 / 3:
      classes[2] = classes[0]
    while True:
      sides = [int(s) for s in rng.integers(SIDE_MIN, SIDE_MAX + 1, size=n)]
      places = _place(sides, rng)
      if places is not None:
        break
    order = np.argsort([2 * left + side for (_, left), side in zip(places, sides)])
    cells = [(places[i][0], places[i][1], sides[i]) for i in order]
    classes = [classes[i] for i in order]
    picks = [int(rng.choice(by_digit[c])) for c in classes]
    while len(set(picks)) < n:  # A repeated class shows two different images.
      picks = [int(rng.choice(by_digit[c])) for c in classes]
    canvas = render([images[i] for i in picks], cells)
    boxes = np.array([[t, l, t + s, l + s] for t, l, s in cells], np.float32) / IMAGE_SIZE
    yield example_id, {
        "image": digits_captions.png_bytes(Image.fromarray(canvas, mode="L").convert("RGB")),
        "text": caption(classes, rng),
        "boxes": boxes,
        "box_texts": referring_expressions(classes, rng),
        "box_labels": classes,
        "digit_ids": picks,
        "id": example_id,
    }


class DigitsBoxes(tfds.core.GeneratorBasedBuilder):
  """2-3 scikit-learn digits placed on a canvas, with boxes and referring expressions."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                                         encoding_format="png"),
            "text": tfds.features.Text(),
            "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
            "box_texts": tfds.features.Sequence(tfds.features.Text()),
            "box_labels": tfds.features.Sequence(tfds.features.ClassLabel(names=list(WORDS))),
            "digit_ids": tfds.features.Sequence(np.int32),
            "id": np.int32,
        }),
        homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the digits ship with scikit-learn.
    return {"train": self._generate_examples("train"),
            "test": self._generate_examples("test")}

  def _generate_examples(self, split):
    yield from generate(split)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU of yxyx boxes a [..., 4] and b [..., 4] (broadcast)."""
  h = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  w = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  inter = h * w
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  return inter / (area(a) + area(b) - inter)


def chance_levels(split: str = "test", seed: int = 0) -> dict[str, float]:
  """Referring accuracy (IoU >= 0.5) of three guesses over `split`'s boxes: a random box of the
  canvas's own ("own_box"), the best fixed box ("fixed_box"), a random box of a true size at a
  random place ("random_box")."""
  rng = np.random.default_rng(seed)
  truth, own = [], []
  for _, ex in generate(split):
    for box in ex["boxes"]:
      truth.append(box)
      own.append(ex["boxes"][rng.integers(len(ex["boxes"]))])
  truth, own = np.stack(truth), np.stack(own)
  grid = [[t, l, t + s, l + s] for s in range(16, 49, 4) for t in range(0, 49 - s, 2)
          for l in range(0, 49 - s, 2)]
  grid = np.asarray(grid, np.float64) / IMAGE_SIZE
  fixed = (iou(truth[:, None], grid[None]) >= 0.5).mean(0).max()
  sides = (truth[:, 2] - truth[:, 0])[rng.permutation(len(truth))]
  corner = rng.uniform(0, 1 - sides[:, None], size=(len(truth), 2))
  random_box = np.concatenate([corner, corner + sides[:, None]], 1)
  return {"own_box": float((iou(truth, own) >= 0.5).mean()), "fixed_box": float(fixed),
          "random_box": float((iou(truth, random_box) >= 0.5).mean())}


def train_tokenizer(out: str) -> str:
  """Trains the boxes tokenizer (make_tokenizer.DEMO_SETTINGS) on the train split's captions
  and box texts (from the generator); -> its path."""
  from tools import make_tokenizer  # pylint: disable=g-import-not-at-top
  texts = []
  for _, ex in generate("train"):
    texts.append(ex["text"])
    texts.extend(ex["box_texts"])
  return make_tokenizer.train(texts, out, **make_tokenizer.DEMO_SETTINGS)


def build(data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Builds (if needed) and returns the builder; `data_dir=None` = TFDS's default."""
  builder = DigitsBoxes(data_dir=data_dir, file_format="array_record")
  with digits_captions.deterministic_serialization():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder
