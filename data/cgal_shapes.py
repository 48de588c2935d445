"""`cgal_shapes`: CGAL's demo meshes as point clouds, renderings and names (ULIP-style 3D data).

Source: the meshes `data/meshes/*.off` in CGAL's data tarball, which the Debian package
`libcgal-demo` installs as /usr/share/doc/libcgal-dev/data.tar.gz (5.5.1: 138 meshes: bunny,
cow, elephant, armadillo, cube, torus, ...). Licence (the package's copyright file, from CGAL's
LICENSE): files without an explicit copyright notice, the data files among them, are under
Creative Commons CC0 1.0. Nothing of the meshes is in this repository: the dataset is built
from the installed package.

Shapes: every mesh that parses as OFF / COFF (polygons fan-triangulated) with a positive
surface area, in file name order; geometrically identical meshes (the same vertices up to
order, translation and scale: cube / cube-shuffled / translated-cube) are kept once, under the
first name. `load_shapes()` returns them and counts the meshes left out (unreadable,
degenerate, duplicate); 5.5.1 gives 121 shapes (17 duplicates).

Each record is one view of a shape: a random rotation (uniform over SO(3)) and a fresh
area-weighted sample of its surface, seeded by (split, shape, view):
  "points": float32 [NUM_POINTS=2048, 3], the rotated surface sample, centred at its centroid
            and scaled into the unit sphere
  "image":  RGB uint8 [64, 64, 3] PNG: the rotated shape seen along -z (orthographic, the same
            frame as the points), Lambert-shaded grey on white (a z-buffered dense surface
            sample, numpy only)
  "name":   the file name made readable ("cube meshed", "chinese dragon 10kv")
  "text":   "a 3d model of a cube meshed" / "an elephant"
  "label":  the shape's index; "view": the view's index; "id": the record's index
Splits: "train" TRAIN_VIEWS = 4 views per shape, "test" TEST_VIEWS = 2 other views (other
rotations and surface samples) of the same shapes: retrieval of held-out views, robust to
rotation and subsampling.

Build with `python data/cgal_shapes.py [--data_dir DIR]` or `build(data_dir)` (needs
`apt-get install libcgal-demo`; no TensorFlow: the images go in PNG-encoded).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import hashlib
import os
import re
import sys
import tarfile

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from big_mm.input import points as points_lib  # pylint: disable=wrong-import-position
from data import digits_captions  # pylint: disable=g-import-not-at-top,wrong-import-position

SEED = 0
PACKAGE = "libcgal-demo"
DATA_TARS = ("/usr/share/doc/libcgal-dev/data.tar.gz", "/usr/share/doc/libcgal-demo/data.tar.gz")
MESH_DIR = "data/meshes/"
NUM_POINTS = 2048
RENDER_POINTS = 40_000  # surface samples splatted into the rendering
IMAGE_SIZE = 64
TRAIN_VIEWS = 4
TEST_VIEWS = 2
SPLITS = {"train": (0, TRAIN_VIEWS), "test": (1, TEST_VIEWS)}  # split -> (seed id, views)
LIGHT = np.array([0.3, 0.5, 1.0]) / np.linalg.norm([0.3, 0.5, 1.0])


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str  # the file name without ".off"
  vertices: np.ndarray  # float64 [v, 3]
  triangles: np.ndarray  # int64 [t, 3]


def data_tar() -> str:
  """The installed CGAL data tarball (FileNotFoundError saying what to install)."""
  for path in DATA_TARS:
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f"CGAL's data tarball is missing ({' or '.join(DATA_TARS)}): install "
                          f"the Debian package {PACKAGE} (apt-get install -y {PACKAGE}).")


def parse_off(text: str) -> tuple[np.ndarray, np.ndarray]:
  """OFF / COFF text -> (vertices float64 [v, 3], triangles int64 [t, 3]); polygons are
  fan-triangulated, per-vertex / per-face colours ignored. ValueError when it does not parse."""
  lines = [ln.split("#", 1)[0].split() for ln in text.splitlines()]
  tokens = [t for t in lines if t]
  if not tokens or tokens[0][0] not in ("OFF", "COFF"):
    raise ValueError(f"not an OFF / COFF file (header {tokens[0][0] if tokens else ''!r})")
  counts = tokens[0][1:] or tokens[1]
  start = 1 if tokens[0][1:] else 2
  nv, nf = int(counts[0]), int(counts[1])
  if len(tokens) < start + nv + nf:
    raise ValueError(f"{nv} vertices and {nf} faces announced, {len(tokens) - start} lines")
  vertices = np.array([t[:3] for t in tokens[start:start + nv]], np.float64).reshape(nv, 3)
  triangles = []
  for t in tokens[start + nv:start + nv + nf]:
    k = int(t[0])
    if k < 3 or len(t) < k + 1:
      raise ValueError(f"bad face {' '.join(t)!r}")
    poly = [int(i) for i in t[1:k + 1]]
    triangles.extend((poly[0], poly[j], poly[j + 1]) for j in range(1, k - 1))
  triangles = np.asarray(triangles, np.int64).reshape(-1, 3)
  if not np.all(np.isfinite(vertices)) or triangles.min(initial=0) < 0 or (
      triangles.max(initial=0) >= nv):
    raise ValueError("non-finite vertices or face indices out of range")
  return vertices, triangles


def triangle_areas(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
  a, b, c = (vertices[triangles[:, i]] for i in range(3))
  return 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)


def _fingerprint(vertices: np.ndarray) -> str:
  """Vertices up to order, translation and scale (rounded): finds duplicated meshes."""
  v = vertices - vertices.mean(0)
  v = np.round(v / max(np.abs(v).max(), 1e-12), 4) + 0.0  # + 0.0: no -0.0
  return hashlib.sha1(v[np.lexsort(v.T[::-1])].tobytes()).hexdigest()


@functools.cache
def load_shapes(names: tuple[str, ...] | None = None
                ) -> tuple[tuple[Shape, ...], collections.Counter]:
  """The shapes (module docstring) in file name order, and the counts of meshes left out:
  "unreadable", "degenerate" (zero area), "duplicate". names: only these meshes (tests)."""
  members = {}
  with tarfile.open(data_tar()) as tar:
    for m in tar:
      stem = m.name[len(MESH_DIR):-len(".off")]
      if (m.isfile() and m.name.startswith(MESH_DIR) and m.name.endswith(".off")
          and "/" not in stem and (names is None or stem in names)):
        members[stem] = tar.extractfile(m).read()
  if names is not None and set(names) - set(members):
    raise ValueError(f"no meshes {sorted(set(names) - set(members))} in {data_tar()}")
  shapes, skipped, seen = [], collections.Counter(), set()
  for stem in sorted(members):
    try:
      vertices, triangles = parse_off(members[stem].decode("utf-8", "replace"))
    except (ValueError, IndexError):
      skipped["unreadable"] += 1
      continue
    if len(triangles) == 0 or triangle_areas(vertices, triangles).sum() <= 0:
      skipped["degenerate"] += 1
      continue
    key = _fingerprint(vertices)
    if key in seen:
      skipped["duplicate"] += 1
      continue
    seen.add(key)
    shapes.append(Shape(stem, vertices, triangles))
  return tuple(shapes), skipped


def readable(name: str) -> str:
  """'cube-meshed' -> 'cube meshed', 'ChineseDragon-10kv' -> 'chinese dragon 10kv'."""
  name = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
  return " ".join(re.sub(r"[-_]+", " ", name).lower().split())


def caption(name: str) -> str:
  text = readable(name)
  return f"a 3d model of {'an' if text[0] in 'aeiou' else 'a'} {text}"


def sample_surface(shape: Shape, n: int, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
  """n points uniform on the surface (area-weighted triangles, uniform barycentric) and their
  triangles' unit normals: (float64 [n, 3], float64 [n, 3])."""
  v, t = shape.vertices, shape.triangles
  areas = triangle_areas(v, t)
  tri = rng.choice(len(t), size=n, p=areas / areas.sum())
  r1, r2 = np.sqrt(rng.random((n, 1))), rng.random((n, 1))
  a, b, c = (v[t[tri, i]] for i in range(3))
  normals = np.cross(b - a, c - a)
  normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
  return (1 - r1) * a + r1 * (1 - r2) * b + r1 * r2 * c, normals


def render(surface: np.ndarray, normals: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
  """Surface points in the unit sphere (and their normals) seen along -z -> RGB uint8
  [size, size, 3]: the nearest point (largest z) of each pixel, grey by |n . LIGHT|, on white."""
  px = np.clip(((surface[:, :2] + 1) / 2 * size).astype(np.int64), 0, size - 1)
  pixel = (size - 1 - px[:, 1]) * size + px[:, 0]  # row 0 at the top (+y up)
  order = np.lexsort((-surface[:, 2], pixel))  # per pixel, nearest first
  first = order[np.unique(pixel[order], return_index=True)[1]]
  grey = np.full(size * size, 255.0)
  grey[pixel[first]] = 40 + 190 * np.abs(normals[first] @ LIGHT)
  return np.repeat(np.round(grey).astype(np.uint8).reshape(size, size, 1), 3, axis=2)


def view(shape: Shape, split: str, label: int, index: int, seed: int = SEED) -> dict:
  """One record's points, image and rotation (a pure function of its arguments)."""
  rng = np.random.default_rng([seed, SPLITS[split][0], label, index])
  rotation = points_lib.random_rotation("so3", rng)
  pts = sample_surface(shape, NUM_POINTS, rng)[0] @ rotation.T
  surface, normals = sample_surface(shape, RENDER_POINTS, rng)
  surface, normals = surface @ rotation.T, normals @ rotation.T
  centre = pts.mean(0)
  radius = np.linalg.norm(pts - centre, axis=1).max()
  return {"points": ((pts - centre) / radius).astype(np.float32),
          "image": render((surface - centre) / radius, normals), "rotation": rotation}


def generate(split: str, names: tuple[str, ...] | None = None, seed: int = SEED):
  """Yields (key, example) for `split`: every shape's views, by shape then view."""
  shapes, _ = load_shapes(names)
  views = SPLITS[split][1]
  for label, shape in enumerate(shapes):
    for index in range(views):
      r = view(shape, split, label, index, seed)
      key = label * views + index
      yield key, {"points": r["points"],
                  "image": digits_captions.png_bytes(Image.fromarray(r["image"], mode="RGB")),
                  "name": readable(shape.name), "text": caption(shape.name), "label": label,
                  "view": index, "id": key}


class CgalShapes(tfds.core.GeneratorBasedBuilder):
  """CGAL's demo meshes: point clouds, renderings and names."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release (libcgal-demo 5.5.1)."}

  def __init__(self, *, names: tuple[str, ...] | None = None, **kwargs):
    self.names = names
    super().__init__(**kwargs)

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
            "points": tfds.features.Tensor(shape=(NUM_POINTS, 3), dtype=np.float32),
            "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
            "name": tfds.features.Text(),
            "text": tfds.features.Text(),
            "label": np.int64,
            "view": np.int32,
            "id": np.int32,
        }),
        homepage="https://www.cgal.org/",
        license="CGAL data files: CC0 1.0 (Debian libcgal-demo's copyright file).",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the meshes come from the installed package.
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    yield from generate(split, self.names)


def build(data_dir: str | None = None, names: tuple[str, ...] | None = None
          ) -> tfds.core.DatasetBuilder:
  """Builds (if needed) and returns the builder; names: only these meshes (a small build)."""
  data_tar()  # Fail before TFDS starts writing, saying what to install.
  builder = CgalShapes(data_dir=data_dir, file_format="array_record",
                       names=None if names is None else tuple(names))
  with digits_captions.deterministic_serialization():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data_dir", default=None,
                 help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  args = p.parse_args(argv)
  shapes, skipped = load_shapes()
  print(f"{len(shapes)} shapes; left out: {dict(skipped)}")
  builder = build(args.data_dir)
  for split, info in builder.info.splits.items():
    print(f"cgal_shapes {split}: {info.num_examples} examples in {builder.data_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
