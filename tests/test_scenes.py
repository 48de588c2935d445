"""The `multimodal_scenes` demo dataset (data/scenes.py): rendering, alignment, captions, TFDS."""
import glob
import io
import os
import re
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from big_mm.input import sources
from data import scenes

IDS = range(0, 4500, 15)  # 300 scenes over both splits.
OBJECT = re.compile(r"a (small|large) ({}) ({})".format("|".join(scenes.COLOURS),
                                                        "|".join(scenes.SHAPES)))


def _parse(caption):
  """caption -> (objects near to far as (size, colour, shape), relation word or None)."""
  relation = "in front of" if " in front of " in caption else (
      "behind" if " behind " in caption else None)
  parts = caption.split(f" {relation} ") if relation else [caption]
  named = []
  for part in parts:
    m = OBJECT.fullmatch(part)
    assert m, (caption, part)
    named.append(m.groups())
  return (named[::-1] if relation == "behind" else named), relation


def test_render_deterministic_and_varies():
  a, b = scenes.render(7), scenes.render(7)
  for k in ("rgb", "depth", "semseg"):
    np.testing.assert_array_equal(a[k], b[k])
  assert (a["caption"], a["label"]) == (b["caption"], b["label"])
  assert a["rgb"].dtype == np.uint8 and a["rgb"].shape == (32, 32, 3)
  assert a["depth"].dtype == np.float32 and a["depth"].shape == (32, 32)
  assert a["semseg"].dtype == np.uint8 and a["semseg"].shape == (32, 32)
  others = [scenes.render(8), scenes.render(7, seed=1)]
  for o in others:
    assert not np.array_equal(a["rgb"], o["rgb"])
    assert not np.array_equal(a["depth"], o["depth"])
  assert len({scenes.render(i)["caption"] for i in range(20)}) > 10


def test_fields_aligned_and_nearest_wins():
  bg = scenes.background_depth(horizon=6.0, cam_height=1.5, far=10.0)
  # Ground depth grows towards the top, up to the wall.
  assert np.all(np.diff(bg[:, 0]) <= 0) and bg.max() == 10.0 and bg.min() < 2.0
  # The camera varies per scene: the background depth at a fixed pixel is not a constant.
  walls = [scenes.render(i)["depth"][12, 0] for i in range(20)]
  assert np.std(walls) > 0.5
  overlap_pixels = 0
  counts = np.zeros(4)
  labels = []
  for i in IDS:
    r = scenes.render(i)
    objs, depth, semseg = r["objects"], r["depth"], r["semseg"]
    bg = scenes.background_depth(**r["camera"])
    assert 1 <= len(objs) <= 3
    assert len({o["colour"] for o in objs}) == len(objs)
    assert [o["depth"] for o in objs] == sorted(o["depth"] for o in objs)  # Near to far.
    masks = np.stack([o["mask"] for o in objs])
    covered = masks.any(0)
    overlap_pixels += int((masks.sum(0) > 1).sum())
    # semseg is background exactly where no shape is; there depth is the ground / wall.
    np.testing.assert_array_equal(semseg == 0, ~covered)
    np.testing.assert_array_equal(depth[~covered], bg[~covered].astype(np.float32))
    assert np.all(depth[covered] < bg[covered])
    # Each pixel shows the nearest object covering it (objects are sorted near to far).
    z = np.where(masks, np.array([o["depth"] for o in objs])[:, None, None], np.inf)
    nearest = np.argmin(z, axis=0)
    np.testing.assert_array_equal(depth[covered], z.min(0)[covered].astype(np.float32))
    classes = np.array([scenes.SEMSEG_CLASSES.index(o["shape"]) for o in objs])
    np.testing.assert_array_equal(semseg[covered], classes[nearest[covered]])
    for k, o in enumerate(objs):
      visible = covered & (nearest == k)
      assert visible.sum() >= max(3, 0.5 * o["mask"].sum()), (i, k)
      # The object's dominant colour channel stays dominant under the light.
      c = int(np.argmax(scenes.COLOURS[o["colour"]]))
      px = r["rgb"][visible].astype(int)
      assert np.all(px[:, c] == px.max(-1)), (i, o["colour"])
    # The nearest object is the class at the nearest shape pixel.
    front = np.unravel_index(np.argmin(np.where(covered, depth, np.inf)), depth.shape)
    assert semseg[front] - 1 == scenes.SHAPES.index(objs[0]["shape"])
    counts[semseg[front]] += 1
    assert r["label"] == len(objs) - 1  # Label: the number of objects.
    labels.append(r["label"])
  assert overlap_pixels > 100  # The occlusion rule was really exercised.
  assert np.all(counts[1:] > 50)  # Every shape is the nearest one in many scenes.
  assert np.all(np.bincount(labels, minlength=3) > 60)  # 1, 2 and 3 objects all occur.


def test_caption_names_objects_and_depth_order():
  relations = set()
  for i in IDS:
    r = scenes.render(i)
    named, relation = _parse(r["caption"])
    relations.add(relation)
    assert (relation is None) == (len(r["objects"]) == 1)
    assert named == [(o["size"], o["colour"], o["shape"]) for o in r["objects"]]
    # The near-to-far order the caption states agrees with the depth map: each named object
    # is visible at its depth, and those depths increase.
    zs = []
    for size, colour, shape in named:
      o = next(o for o in r["objects"] if o["colour"] == colour)
      cls = scenes.SEMSEG_CLASSES.index(shape)
      assert np.any((r["depth"] == np.float32(o["depth"])) & (r["semseg"] == cls))
      zs.append(o["depth"])
    assert zs == sorted(zs) and len(set(zs)) == len(zs)
    assert np.all(np.diff(zs) >= scenes.MIN_GAP)
  assert relations == {None, "in front of", "behind"}


def test_split_ids_disjoint():
  train, test = scenes.split_ids("train"), scenes.split_ids("test")
  assert (len(train), len(test)) == (scenes.NUM_TRAIN, scenes.NUM_TEST) == (4000, 500)
  assert not set(train) & set(test)
  with pytest.raises(ValueError, match="splits"):
    scenes.split_ids("validation")


def test_read_back_tfds(scenes_dir):
  skip = {"image": tfds.decode.SkipDecoding()}
  ids = {}
  for split in ("train", "test"):
    ds = tfds.data_source("multimodal_scenes", split=split, data_dir=scenes_dir, decoders=skip)
    ids[split] = sorted(int(ds[j]["id"]) for j in range(len(ds)))
  assert ids["train"] == list(scenes.split_ids("train"))
  assert ids["test"] == list(scenes.split_ids("test"))

  ds = tfds.data_source("multimodal_scenes", split="test", data_dir=scenes_dir)
  assert ds.dataset_info.features["label"].names == list(scenes.COUNTS)
  for j in (0, 1, len(ds) - 1):
    ex = ds[j]
    assert set(ex) == {"image", "depth", "semseg", "text", "label", "id"}
    r = scenes.render(int(ex["id"]))
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (32, 32, 3)
    np.testing.assert_array_equal(ex["image"], r["rgb"])
    assert ex["depth"].dtype == np.float32 and ex["depth"].shape == (32, 32)
    np.testing.assert_array_equal(ex["depth"], r["depth"])
    assert ex["semseg"].dtype == np.uint8 and ex["semseg"].shape == (32, 32)
    np.testing.assert_array_equal(ex["semseg"], r["semseg"])
    assert ex["text"].decode() == r["caption"] and int(ex["label"]) == r["label"]

  # What the pipeline sees: PNG bytes for the image, arrays for depth and semseg, str text.
  ex = sources.open_source("multimodal_scenes", "test", scenes_dir)[0]
  assert isinstance(ex["image"], bytes) and ex["image"][:4] == b"\x89PNG"
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(ex["image"]))),
                                scenes.render(int(ex["id"]))["rgb"])
  assert isinstance(ex["text"], str) and ex["depth"].dtype == np.float32
  assert "tensorflow" not in sys.modules


def test_builder_deterministic(scenes_dir, tmp_path):
  scenes.build(str(tmp_path))
  files = sorted(glob.glob(os.path.join(scenes_dir, "multimodal_scenes", "1.0.0",
                                        "*.array_record*")))
  assert len(files) == 2
  for f in files:
    other = os.path.join(tmp_path, "multimodal_scenes", "1.0.0", os.path.basename(f))
    with open(f, "rb") as a, open(other, "rb") as b:
      assert a.read() == b.read(), f
