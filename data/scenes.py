"""`multimodal_scenes`: tiny rendered 3-D scenes with aligned RGB, depth, semseg and caption.

The bundled demo dataset of the MultiMAE recipe. Each 32x32 scene is rendered procedurally,
deterministically from (SEED, example id): 1-3 flat shapes (circle, square, triangle;
red/green/blue/yellow/purple/orange, distinct colours per scene; small 0.7 m or large 1.2 m)
stand upright on a ground plane at depths 2-6 m (at least 0.5 m apart), facing the camera.
A pinhole camera (focal length 32 px, optical axis horizontal) sees the ground up to a back
wall; per scene, the camera height (1.0-1.6 m), the horizon row (2 .. as low as keeps a 2 m
object in frame) and the wall distance (8-14 m) are drawn, so depth must be read from the
image, not from the pixel position. Depth shows in the RGB: apparent size ~ 1/z, nearer
objects stand lower in the image and occlude farther ones (a per-pixel z-buffer), the
ground/wall boundary gives the horizon, and the ground is darker far away. Ground and wall get
dull random colours with pixel noise; a per-scene light (intensity, direction) scales all
colours and shades each shape with a linear gradient. Every object keeps at least half of
its silhouette (and 3 pixels) visible. No anti-aliasing: every field is the front surface
at the pixel centre, so all fields are exactly aligned.

Fields (what `tfds.data_source("multimodal_scenes", ...)[i]` returns):
  "image":  RGB uint8 [32, 32, 3], stored as PNG (bytes when image decoding is skipped)
  "depth":  float32 [32, 32] metres of the front surface (Tensor feature)
  "semseg": uint8 [32, 32] class ids, SEMSEG_CLASSES: 0 background (ground and wall),
            1 circle, 2 square, 3 triangle (Tensor feature)
  "text":   caption naming every object (size, colour, shape) near to far with
            "in front of", or far to near with "behind": "a small green triangle",
            "a large red circle behind a small blue square",
            "a small red circle in front of a large blue square in front of a small green
            triangle"
  "label":  ClassLabel (one, two, three): the number of objects (a scene-level property for
            the few-shot linear probe; the nearest object's shape is not linearly readable
            even from raw pixels)
  "id":     int32, the example id: train 0..3999, test 4000..4499
Splits: "train" NUM_TRAIN = 4000, "test" NUM_TEST = 500.

`render(example_id)` is the pure function behind every record (numpy arrays, no TFDS), for
tests and evaluators. Like `digits_captions`, this is an array_record TFDS builder written
without TensorFlow (the image goes in PNG-encoded; Tensor features need no TF), read with
`tfds.data_source("multimodal_scenes", data_dir=...)`. Build it with
`python data/build_demo.py [--data_dir DIR]`.
"""
from __future__ import annotations


from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data import digits_captions

SEED = 0
IMAGE_SIZE = 32
NUM_TRAIN = 4000
NUM_TEST = 500
SEMSEG_CLASSES = ("background", "circle", "square", "triangle")
SHAPES = SEMSEG_CLASSES[1:]  # SHAPES index = semseg class - 1
COUNTS = ("one", "two", "three")  # label = number of objects - 1
COLOURS = {  # Saturated, far from the dull background colours.
    "red": (215, 35, 35), "green": (40, 175, 55), "blue": (45, 75, 225),
    "yellow": (235, 205, 35), "purple": (145, 45, 185), "orange": (240, 130, 25),
}
SIZES = {"small": 0.7, "large": 1.2}  # metres: circle diameter, square side, triangle base+height

# Camera: pinhole, optical axis horizontal, FOCAL px, cam_height m above the ground, horizon at
# image row `horizon` (rows grow downwards; both drawn per scene by `_camera`). A ground point
# at depth z is seen at row horizon + FOCAL * cam_height / z; the ground ends at the wall (far).
FOCAL = 32.0
DEPTH_RANGE = (2.0, 6.0)  # Object depths, metres.
MIN_GAP = 0.5  # Minimum depth difference between two objects of a scene, metres.
MIN_VISIBLE = 0.5  # Fraction of each object's silhouette that must stay visible.

_CENTRES = np.arange(IMAGE_SIZE, dtype=np.float64) + 0.5  # Pixel centres.


def background_depth(horizon: float, cam_height: float, far: float) -> np.ndarray:
  """float64 [32, 32]: depth of the background (ground, back wall) at each pixel centre."""
  below = _CENTRES - horizon
  rows = np.full(IMAGE_SIZE, far)
  ground = below > 0
  rows[ground] = np.minimum(far, FOCAL * cam_height / below[ground])
  return np.repeat(rows[:, None], IMAGE_SIZE, axis=1)


def _camera(rng: np.random.Generator) -> dict:
  """A per-scene camera height, horizon row and wall distance (so depth must be read from the
  image, not from the pixel position). The nearest object (DEPTH_RANGE[0]) stays in frame."""
  cam_height = float(rng.uniform(1.0, 1.6))
  lowest = IMAGE_SIZE - FOCAL * cam_height / DEPTH_RANGE[0]
  return dict(cam_height=cam_height, horizon=float(rng.uniform(2.0, lowest)),
              far=float(rng.uniform(8.0, 14.0)))


def _silhouette(shape: str, cx: float, base: float, side: float) -> np.ndarray:
  """bool [32, 32]: pixel centres inside `shape` (side px) standing on row `base` at column cx."""
  y, x = _CENTRES[:, None], _CENTRES[None, :]
  if shape == "circle":
    r = side / 2
    return (x - cx) ** 2 + (y - (base - r)) ** 2 < r * r
  rows = (y > base - side) & (y < base)
  if shape == "square":
    return rows & (np.abs(x - cx) < side / 2)
  # Upright triangle: apex at the top centre, base on the ground.
  return rows & (np.abs(x - cx) < (y - (base - side)) / 2)


def _sample_kinds(rng: np.random.Generator) -> list[tuple[str, str, str]]:
  """1-3 (shape, colour, size), colours distinct."""
  n = int(rng.integers(1, 4))
  colours = rng.choice(len(COLOURS), size=n, replace=False)
  return [(SHAPES[int(rng.integers(len(SHAPES)))], tuple(COLOURS)[int(c)],
           tuple(SIZES)[int(rng.integers(len(SIZES)))]) for c in colours]


def _place(kinds, camera: dict, rng: np.random.Generator) -> list[dict]:
  """Draws a depth and a column for each object: its silhouette and where it stands."""
  objects = []
  for shape, colour, size in kinds:
    z = float(rng.uniform(*DEPTH_RANGE))
    side = FOCAL * SIZES[size] / z  # Apparent size ~ 1/z.
    cx = float(rng.uniform(side / 2, IMAGE_SIZE - side / 2))
    base = camera["horizon"] + FOCAL * camera["cam_height"] / z  # The ground at depth z.
    objects.append(dict(shape=shape, colour=colour, size=size, depth=z,
                        mask=_silhouette(shape, cx, base, side), cx=cx, cy=base - side / 2,
                        side=side))
  return objects


def _valid(objects: list[dict], owner: np.ndarray) -> bool:
  """Depths MIN_GAP apart and every object at least MIN_VISIBLE (and 3 pixels) visible."""
  z = np.sort([o["depth"] for o in objects])
  if np.any(np.diff(z) < MIN_GAP):
    return False
  for i, o in enumerate(objects):
    visible = int(np.sum(owner == i))
    if visible < max(3, MIN_VISIBLE * int(o["mask"].sum())):
      return False
  return True


def _describe(o: dict) -> str:
  return f"a {o['size']} {o['colour']} {o['shape']}"


def render(example_id: int, seed: int = SEED) -> dict:
  """Renders example `example_id` (a pure function of its arguments).

  Returns {"rgb": uint8 [32,32,3], "depth": float32 [32,32] metres, "semseg": uint8 [32,32],
  "caption": str, "label": int (number of objects - 1), "objects": tuple of dicts
  near to far (shape, colour, size, depth in m, mask: bool [32,32] full silhouette before
  occlusion, cx, cy, side in px), "camera": {cam_height, horizon, far}}.
  """
  rng = np.random.default_rng([seed, example_id])
  camera = _camera(rng)
  bg = background_depth(**camera)
  kinds = _sample_kinds(rng)
  while True:  # Rejection sampling of the placement (a few tries for 3 objects).
    objects = _place(kinds, camera, rng)
    depth, owner = bg.copy(), np.full(bg.shape, -1)
    for i in np.argsort([-o["depth"] for o in objects]):  # Far to near, with a z-test.
      hit = objects[i]["mask"] & (objects[i]["depth"] < depth)
      depth[hit], owner[hit] = objects[i]["depth"], i
    if _valid(objects, owner):
      break

  # Background: a dull ground darkening with distance, a dull wall, pixel noise.
  ground_col = rng.uniform(70, 140) + rng.uniform(-20, 20, size=3)
  wall_col = rng.uniform(110, 180) + rng.uniform(-15, 15, size=3)
  is_wall = bg >= camera["far"]
  fade = 1.0 - 0.35 * (bg - DEPTH_RANGE[0]) / (camera["far"] - DEPTH_RANGE[0])
  rgb = np.where(is_wall[..., None], wall_col, ground_col * fade[..., None])
  rgb = rgb + rng.uniform(-8, 8, size=rgb.shape)

  # Light: one intensity for the scene, a gradient along `angle` across each shape.
  intensity = rng.uniform(0.7, 1.15)
  angle = rng.uniform(0, 2 * np.pi)
  rgb *= intensity
  y, x = _CENTRES[:, None], _CENTRES[None, :]
  semseg = np.zeros(bg.shape, np.uint8)
  for i, o in enumerate(objects):
    pix = owner == i
    along = ((x - o["cx"]) * np.cos(angle) + (y - o["cy"]) * np.sin(angle)) / (o["side"] / 2)
    shade = intensity * (1.0 + 0.3 * np.clip(along, -1, 1))
    rgb[pix] = np.asarray(COLOURS[o["colour"]], np.float64) * shade[pix][:, None]
    semseg[pix] = SEMSEG_CLASSES.index(o["shape"])

  order = sorted(objects, key=lambda o: o["depth"])  # Near to far.
  if rng.random() < 0.5:
    caption = " in front of ".join(_describe(o) for o in order)
  else:
    caption = " behind ".join(_describe(o) for o in reversed(order))
  return {
      "rgb": np.clip(np.round(rgb), 0, 255).astype(np.uint8),
      "depth": depth.astype(np.float32),
      "semseg": semseg,
      "caption": caption,
      "label": len(objects) - 1,
      "objects": tuple(order),
      "camera": camera,
  }


def split_ids(split: str) -> range:
  """The example ids of `split`: train 0..NUM_TRAIN-1, test the NUM_TEST after them."""
  ids = {"train": range(NUM_TRAIN), "test": range(NUM_TRAIN, NUM_TRAIN + NUM_TEST)}
  if split not in ids:
    raise ValueError(f"multimodal_scenes has splits 'train' and 'test', not {split!r}.")
  return ids[split]


def to_png(rgb: np.ndarray) -> bytes:
  return digits_captions.png_bytes(Image.fromarray(rgb, mode="RGB"))


def generate(split: str, seed: int = SEED):
  """Yields (key, example) for `split` in id order."""
  for i in split_ids(split):
    r = render(i, seed)
    yield i, {
        "image": to_png(r["rgb"]),
        "depth": r["depth"],
        "semseg": r["semseg"],
        "text": r["caption"],
        "label": r["label"],
        "id": i,
    }


class MultimodalScenes(tfds.core.GeneratorBasedBuilder):
  """Rendered shapes on a ground plane: RGB, depth, semseg, caption."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  # As in digits_captions: the default `code_path` probes `importlib_resources`.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    s = IMAGE_SIZE
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
            "depth": tfds.features.Tensor(shape=(s, s), dtype=np.float32),
            "semseg": tfds.features.Tensor(shape=(s, s), dtype=np.uint8),
            "text": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=list(COUNTS)),
            "id": np.int32,
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: rendered here.
    return {"train": self._generate_examples("train"),
            "test": self._generate_examples("test")}

  def _generate_examples(self, split):
    yield from generate(split)


def build(data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Builds (if needed) and returns the builder; `data_dir=None` = TFDS's default."""
  builder = MultimodalScenes(data_dir=data_dir, file_format="array_record")
  with digits_captions.deterministic_serialization():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder
