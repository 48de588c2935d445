"""data/cgal_shapes.py: OFF parsing, surface sampling, rendering, names, and a small TFDS build
from CGAL's meshes (Debian libcgal-demo)."""
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data import cgal_shapes as cs

pytestmark = pytest.mark.skipif(
    not any(os.path.exists(p) for p in cs.DATA_TARS),
    reason=f"CGAL's data tarball ({cs.DATA_TARS[0]}) is missing: install the Debian package "
           f"{cs.PACKAGE} (.ci/run installs it).")

# cube-shuffled: the cube's vertices in another order (a duplicate, left out).
NAMES = ("cube", "cube-shuffled", "octahedron", "pyramid")


def test_parse_off_triangulates_and_rejects_bad_files():
  v, t = cs.parse_off("# a comment\nCOFF 4 1 0\n0 0 0 1 0 0 1\n1 0 0 1 0 0 1\n1 1 0 1 0 0 1\n"
                      "0 1 0 1 0 0 1\n4 0 1 2 3 255 0 0\n")
  np.testing.assert_array_equal(t, [[0, 1, 2], [0, 2, 3]])
  assert v.shape == (4, 3) and cs.triangle_areas(v, t).sum() == pytest.approx(1.0)
  for bad, match in (("PLY\n", "not an OFF"), ("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 5\n",
                                                  "out of range"),
                     ("OFF\n3 1 0\n0 0 0\n1 0 0\n", "announced"),
                     ("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n2 0 1\n", "bad face")):
    with pytest.raises(ValueError, match=match):
      cs.parse_off(bad)


def test_names_and_captions():
  assert cs.readable("cube-meshed") == "cube meshed"
  assert cs.readable("ChineseDragon-10kv") == "chinese dragon 10kv"
  assert cs.readable("corner_with_sharp_edge") == "corner with sharp edge"
  assert cs.caption("cow") == "a 3d model of a cow"
  assert cs.caption("elephant-with-holes") == "a 3d model of an elephant with holes"


def test_surface_samples_are_area_weighted_and_render_shades():
  # Two triangles in the plane z = 0, of areas 0.5 and 4.5.
  shape = cs.Shape("two", np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 0, 0], [5, 0, 0],
                                    [2, 3, 0]], float), np.array([[0, 1, 2], [3, 4, 5]]))
  pts, normals = cs.sample_surface(shape, 4000, np.random.default_rng(0))
  small = np.mean(pts[:, 0] + pts[:, 1] <= 1)
  assert abs(small - 0.1) < 0.03 and np.all(pts[:, 2] == 0)
  np.testing.assert_allclose(np.abs(normals[:, 2]), 1)
  image = cs.render(pts / 5, normals, size=16)
  assert image.shape == (16, 16, 3) and image[15, 0, 0] == 255  # background: white
  # x, y in [0, 1]: the top right quarter. Facing the light along z: grey 40 + 190 * LIGHT_z.
  assert image[7, 8, 0] == round(40 + 190 * cs.LIGHT[2]) and image[0, 15, 0] == 255


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("cgal"))
  cs.build(d, names=NAMES)
  return d


def test_load_shapes_drops_duplicates():
  shapes, skipped = cs.load_shapes(NAMES)
  assert [s.name for s in shapes] == ["cube", "octahedron", "pyramid"]
  assert skipped == {"duplicate": 1}
  with pytest.raises(ValueError, match=r"no meshes \['nothing'\]"):
    cs.load_shapes(("cube", "nothing"))


def _decoded(record):
  return {k: v.decode() if isinstance(v, bytes) and k in ("name", "text") else v
          for k, v in record.items()}


def test_build_views_points_images_and_texts(built):
  shapes, _ = cs.load_shapes(NAMES)
  ds = {s: tfds.data_source("cgal_shapes", data_dir=built, split=s) for s in cs.SPLITS}
  assert (len(ds["train"]), len(ds["test"])) == (3 * cs.TRAIN_VIEWS, 3 * cs.TEST_VIEWS)
  records = {s: sorted((_decoded(ds[s][i]) for i in range(len(ds[s]))), key=lambda r: r["id"])
             for s in ds}
  cube = records["train"][0]
  assert (cube["name"], cube["text"], cube["label"]) == ("cube", "a 3d model of a cube", 0)
  assert records["test"][-1]["text"] == "a 3d model of a pyramid"
  for r in records["train"] + records["test"]:
    p = r["points"]
    assert p.shape == (cs.NUM_POINTS, 3) and p.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(p, axis=1).max(), 1, rtol=1e-5)
    image = r["image"]  # decoded by TFDS
    assert image.shape == (cs.IMAGE_SIZE, cs.IMAGE_SIZE, 3)
    assert 0.05 < np.mean(image[..., 0] < 255) < 0.9  # the shape covers part of the image
  # The stored cube points, rotated back, lie on the faces of an axis-aligned box.
  r = cs.view(shapes[0], "train", 0, 0)
  np.testing.assert_array_equal(r["points"], cube["points"])
  q = r["points"].astype(np.float64) @ r["rotation"]
  on_face = (np.abs(q - q.min(0)) < 1e-5) | (np.abs(q - q.max(0)) < 1e-5)
  assert np.all(on_face.any(axis=1)) and np.ptp(np.ptp(q, axis=0)) < 1e-5  # a cube
  # Held-out views: other rotations and samples of the same shapes.
  test_cube = records["test"][0]
  assert test_cube["label"] == 0 and not np.allclose(test_cube["points"], cube["points"])
  assert not np.array_equal(records["train"][1]["image"], cube["image"])
  np.testing.assert_array_equal(cube["image"], r["image"])


def test_missing_package_says_what_to_install(monkeypatch):
  monkeypatch.setattr(cs, "DATA_TARS", ("/nonexistent/data.tar.gz",))
  with pytest.raises(FileNotFoundError, match=r"apt-get install -y libcgal-demo"):
    cs.build("/nonexistent")
