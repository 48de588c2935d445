"""Boxes through the input pipeline (big_mm/input/boxes.py): each geometric pp op's box map is
exact, flips swap left / right in the texts, crops drop boxes, naflex, and batches of the real
digits_boxes set."""
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from big_mm import config as config_lib
from big_mm.input import boxes
from big_mm.input import pipeline
from big_mm.input import preprocess
from big_mm.input import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "data", "digits_boxes_spm.model")
H, W = 40, 60
BOX = (10, 21, 30, 48)  # Filled rows [10, 30), columns [21, 48) of the synthetic image.


def _image(box=BOX):
  image = np.zeros((H, W, 3), np.uint8)
  image[box[0]:box[2], box[1]:box[3]] = 255
  return image


def _normalised(box=BOX):
  return np.array([[box[0] / H, box[1] / W, box[2] / H, box[3] / W]])


def _ink_box(image):
  """The normalised box of the pixels at least half-filled (half-covered by the drawn box), or
  None; and the image's (height, width)."""
  grey = np.asarray(image, np.float64)[..., 0]
  rows, cols = np.flatnonzero(grey.max(1) >= 127.5), np.flatnonzero(grey.max(0) >= 127.5)
  h, w = grey.shape
  if not len(rows):
    return None, (h, w)
  return np.array([rows[0] / h, cols[0] / w, (rows[-1] + 1) / h, (cols[-1] + 1) / w]), (h, w)


def _run(pp, image, seed):
  ctx = preprocess.Context()
  out = preprocess.apply_pp(preprocess.parse_pp(pp), image, np.random.default_rng(seed), ctx)
  return out, ctx.geometry


@pytest.mark.parametrize("pp", [
    "decode|resize(32)", "decode|resize((50, 25))", "decode|resize_small(24)",
    "decode|central_crop((30, 40))", "decode|random_crop((24, 36))",
    "decode|inception_crop(32, area_min=40)", "decode|flip_lr",
    "decode|resize(64)|random_crop(48)|flip_lr|inception_crop((40, 30), area_min=50)|flip_lr",
    "decode|flip_lr|central_crop(36)|resize_small(50)|value_range(-1, 1)",
])
def test_each_op_moves_the_box_with_the_pixels(pp):
  kept, flipped = 0, 0
  for seed in range(24):
    out, geometry = _run(pp, _image(), seed)
    moved, keep = boxes.transform(_normalised(), geometry)
    if "value_range" in pp:
      out = (out + 1) * 127.5
    flipped += geometry.flipped
    ink, (h, w) = _ink_box(out)
    if ink is None:  # The crop shows none of the box.
      assert not keep[0]
      continue
    # The box bounds the filled pixels of the output within a pixel (resampling blurs edges).
    np.testing.assert_allclose(moved[0], ink, atol=1.01 / min(h, w), err_msg=f"{pp} {seed}")
    # Kept iff the output shows at least half of the box (its ink over the box's scaled area).
    sy, sx = abs(geometry.sy) * h, abs(geometry.sx) * w  # Output pixels per input unit.
    shown = (np.asarray(out)[..., 0] >= 127.5).sum() / ((BOX[2] - BOX[0]) / H * sy
                                                        * (BOX[3] - BOX[1]) / W * sx)
    if abs(shown - 0.5) > 0.1:
      assert keep[0] == (shown > 0.5), (pp, seed, shown)
    kept += keep[0]
  assert kept
  assert (flipped > 0) == ("flip_lr" in pp)


def test_flip_mirrors_the_box_exactly():
  flips = 0
  for seed in range(8):
    out, geometry = _run("decode|flip_lr", _image(), seed)
    moved, _ = boxes.transform(_normalised(), geometry)
    if geometry.flipped:
      flips += 1
      np.testing.assert_array_equal(out, _image()[:, ::-1])
      np.testing.assert_allclose(moved[0], [BOX[0] / H, 1 - BOX[3] / W, BOX[2] / H,
                                            1 - BOX[1] / W], atol=1e-7)
    else:
      np.testing.assert_array_equal(out, _image())
      np.testing.assert_allclose(moved, _normalised(), atol=1e-7)
  assert 0 < flips < 8


def test_crops_drop_boxes_that_lose_half_their_area():
  # central_crop(20) of a 40x60 image keeps rows [10, 30), columns [20, 40).
  geometry = _run("decode|central_crop(20)", _image(), 0)[1]
  assert geometry == boxes.Affine(2.0, -0.5, 3.0, -1.0)
  px = np.array([[10, 10, 30, 30],    # columns 20-30 of 10-30 inside: half kept
                 [10, 11, 30, 30],    # columns 20-30 of 11-30: 10/19 kept
                 [10, 9, 30, 30],     # 10/21 inside: dropped
                 [0, 20, 19, 40],     # rows 10-19 of 0-19: 9/19 inside: dropped
                 [12, 22, 28, 38],    # wholly inside
                 [0, 0, 5, 5]])       # wholly outside
  norm = px / np.array([H, W, H, W])
  moved, keep = boxes.transform(norm, geometry)
  assert keep.tolist() == [True, True, False, False, True, False]
  np.testing.assert_allclose(moved[4], [0.1, 0.1, 0.9, 0.9], atol=1e-6)
  np.testing.assert_allclose(moved[0], [0, 0, 1, 0.5], atol=1e-6)
  # Successive crops count together: 70% kept by each crop is 49% of the box: dropped.
  two = boxes.crop(100, 100, 0, 30, 100, 70).then(boxes.crop(100, 70, 0, 0, 100, 49))
  _, keep = boxes.transform([[0, 0, 1, 1]], two)
  assert not keep[0]


class _Tok:
  """A tokenizer stand-in: one id per word, EOS 1."""

  def __init__(self):
    self.vocab = {}

  def encode_with_info(self, texts, length):
    out = np.zeros((len(texts), length), np.int32)
    for i, t in enumerate(texts):
      ids = [self.vocab.setdefault(w, len(self.vocab) + 2) for w in t.split()][:length - 1]
      out[i, :len(ids) + 1] = ids + [1]
    return out, np.array([len(t.split()) > length - 1 for t in texts])


def test_to_batch_compacts_pads_and_swaps_when_flipped():
  tok = _Tok()
  parsed, texts = boxes.parse([[0.1, 0.0, 0.5, 0.3], [0.2, 0.6, 0.9, 0.95], [0, 0, .1, .1]],
                              [b"the 3 on the left", "the Rightmost 3 ", "the 7"])
  tokenize = lambda t: tok.encode_with_info(t, 6)
  out, ids, counts = boxes.to_batch(parsed, texts, boxes.FLIP_LR, max_boxes=4,
                                    tokenize=tokenize)
  np.testing.assert_allclose(out[0], [0.1, 0.7, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(out[1], [0.2, 0.05, 0.9, 0.4], atol=1e-6)
  assert not out[3].any() and not ids[3].any() and counts == {}
  words = {v: k for k, v in tok.vocab.items()}
  decoded = [" ".join(words[i] for i in row if i > 1) for row in ids[:3]]
  assert decoded == ["the 3 on the right", "the Leftmost 3", "the 7"]
  # Crop away the first box, keep at most 1 of the rest.
  crop = boxes.crop(100, 100, 0, 50, 100, 50)
  out, ids, counts = boxes.to_batch(parsed, texts, crop, max_boxes=2, tokenize=tokenize)
  assert counts == {"boxes_truncated": 1, "boxes_dropped": 1}
  assert out[0].tolist() == pytest.approx([0.2, 0.2, 0.9, 0.9]) and not out[1].any()
  assert ids[0].any() and not ids[1].any()
  # No boxes: the same shapes, all zeros.
  out, ids, _ = boxes.to_batch(*boxes.parse(None, None), boxes.IDENTITY, max_boxes=2,
                               tokenize=tokenize)
  assert out.shape == (2, 4) and ids.shape == (2, 6) and not out.any() and not ids.any()


def test_swap_left_right():
  assert boxes.swap_left_right("the 3 on the left, Left of the RIGHTMOST 4; leftover rights") \
      == "the 3 on the right, Right of the LEFTMOST 4; leftover rights"
  assert boxes.swap_left_right("the 3 in the middle") == "the 3 in the middle"


@pytest.mark.parametrize("value,texts,why", [
    ([[0.1, 0.2, 0.05, 0.4]], ["a"], "ymin < ymax"),
    ([[0.1, 0.2, 0.5, 1.4]], ["a"], "normalised"),
    ([[0.1, 0.2, 0.5]], ["a"], "shape"),
    ([[0.1, 0.2, 0.5, 0.6]], ["a", "b"], "1 boxes but 2"),
    ([[0.1, 0.2, 0.5, 0.6]], None, "no box texts"),
    ([[0.1, 0.2, 0.5, 0.6]], [" "], "empty"),
])
def test_bad_boxes(value, texts, why):
  with pytest.raises(boxes.BadBoxes, match=why):
    boxes.parse(value, texts)


def test_naflex_keeps_normalised_boxes():
  out, geometry = _run("decode|flip_lr|naflex(24, patch_size=4)", _image(), 3)
  gh, gw = (int(v) for v in out.shape)
  p = 4
  image = out.data[:gh * gw].reshape(gh, gw, p, p, 3).transpose(0, 2, 1, 3, 4).reshape(
      gh * p, gw * p, 3)
  assert gh * gw <= 24 and (gh, gw) != (H // p, W // p)
  moved, keep = boxes.transform(_normalised(), geometry)
  ink, (h, w) = _ink_box(image)
  assert keep[0]
  np.testing.assert_allclose(moved[0], ink, atol=1.01 / min(h, w))


def test_randaugment_geometric_ops_lose_the_geometry():
  ctx = preprocess.Context()
  preprocess.OPS["randaugment"].make(num_layers=8, magnitude=9)(_image(), np.random.default_rng(0),
                                                                ctx)
  assert ctx.geometry is None  # 8 draws of 14 ops: a Rotate / Shear / Translate among them.
  with pytest.raises(ValueError, match="randaugment"):
    boxes.check_pp(["decode", "randaugment", "value_range"])


# ---- the pipeline on digits_boxes --------------------------------------------------------

def _input(boxes_dir, pp_image, **changes):
  cfg = dict(data="digits_boxes", data_dir=boxes_dir, tokenizer=TOKENIZER, text_len=16,
             pp_image=pp_image, box_column="boxes", box_text_column="box_texts", max_boxes=4,
             box_text_len=12, num_threads=1, prefetch=0)
  cfg.update(changes)
  return cfg


def _records_by_index(boxes_dir, split):
  return tfds.data_source("digits_boxes", split=split, data_dir=boxes_dir)


def test_eval_batches_carry_the_boxes_of_the_records(boxes_dir):
  tok = tokenizer_lib.Tokenizer(TOKENIZER)
  cfg = _input(boxes_dir, "decode|flip_lr|value_range(-1, 1)")
  records = _records_by_index(boxes_dir, "test")
  batches = pipeline.make_eval_batches(cfg, "test", 8, None)
  flipped = 0
  for b, batch in zip(range(3), batches):
    assert set(batch) == {"image", "text", "boxes", "box_text", "mask"}
    assert batch["boxes"].shape == (8, 4, 4) and batch["boxes"].dtype == np.float32
    assert batch["box_text"].shape == (8, 4, 12) and batch["box_text"].dtype == np.int32
    for i in range(8):
      rec = records[8 * b + i]
      image = (batch["image"][i] + 1) * 127.5
      is_flipped = not np.allclose(image, rec["image"], atol=0.01)
      if is_flipped:
        flipped += 1
        np.testing.assert_allclose(image, rec["image"][:, ::-1], atol=0.01)
      n = len(rec["boxes"])
      want = np.asarray(rec["boxes"])
      if is_flipped:
        want = np.stack([want[:, 0], 1 - want[:, 3], want[:, 2], 1 - want[:, 1]], 1)
      np.testing.assert_allclose(batch["boxes"][i, :n], want, atol=1e-6)
      assert not batch["boxes"][i, n:].any() and not batch["box_text"][i, n:].any()
      texts = [t.decode() for t in rec["box_texts"]]
      swap = boxes.swap_left_right if is_flipped else (lambda t: t)
      assert tok.decode(batch["box_text"][i, :n]) == [swap(t) for t in texts]
      assert tok.decode(batch["text"][i])[0] == swap(rec["text"].decode())
      assert ("right to left" in tok.decode(batch["text"][i])[0]) == is_flipped
  assert 0 < flipped < 24


def test_train_batches_with_crops_and_the_same_draws_as_without_boxes(boxes_dir):
  pp = "decode|resize(64)|inception_crop(48, area_min=30)|flip_lr|value_range(0, 1)"
  it = pipeline.make_train_iterator(_input(boxes_dir, pp), global_batch_size=16, seed=3,
                                    sharding=None)
  plain = pipeline.make_train_iterator(_input(boxes_dir, pp, box_column=None),
                                       global_batch_size=16, seed=3, sharding=None)
  batch, without = next(it), next(plain)
  assert set(batch) == {"image", "text", "boxes", "box_text"} and set(without) == {"image",
                                                                                  "text"}
  np.testing.assert_array_equal(batch["image"], without["image"])  # Same draws.
  assert batch["boxes"].shape == (16, 4, 4) and batch["box_text"].shape == (16, 4, 12)
  present = batch["box_text"].any(-1)
  assert present.any(1).all()
  assert (batch["boxes"][~present] == 0).all()
  b = batch["boxes"][present]
  assert ((b >= 0) & (b <= 1)).all() and (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
  # Every box keeps ink of its digit where the model sees it.
  for i, k in zip(*np.nonzero(present)):
    y0, x0, y1, x1 = np.round(batch["boxes"][i, k] * 48).astype(int)
    assert batch["image"][i, y0:y1, x0:x1].max() > 0.25
  assert not [k for k in it.stats() if k.startswith("skipped/")]


def test_bad_boxes_records_are_skipped(tmp_path):
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(_image()).save(buf, format="PNG")
  rows = [("[[0.1, 0.2, 0.5, 0.6]]", '["the 3"]'), ("[[0.1, 0.2, 0.5, 1.6]]", '["the 3"]'),
          (np.array([[0.1, 0.2, 0.5, 0.6]]), [b"a", b"b"]), (None, None)]
  records = [{"image": buf.getvalue(), "text": "a 3", "bbox": b, "refs": r} for b, r in rows]
  cfg = _input(None, "decode|resize(20)", box_column="bbox", box_text_column="refs",
               max_boxes=2)
  example = pipeline._Example(records, cfg)  # pylint: disable=protected-access
  out = [example.load(i, np.random.default_rng(i)) for i in range(4)]
  assert [o.get(pipeline._SKIP) for o in out] == [None, "bad_boxes", "bad_boxes", None]  # pylint: disable=protected-access
  np.testing.assert_allclose(out[0]["boxes"], [[0.1, 0.2, 0.5, 0.6], [0, 0, 0, 0]], atol=1e-6)
  assert out[0]["box_text"][0].any() and not out[0]["box_text"][1].any()
  assert not out[3]["boxes"].any() and out[3]["box_text"].shape == (2, 12)  # No boxes.
  # Table sources keep only the image and caption columns: boxes must come from TFDS records.
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  pq.write_table(pa.table({"jpg": [buf.getvalue()], "caption": ["a 3"], "bbox": [rows[0][0]],
                           "refs": [rows[0][1]]}), tmp_path / "b.parquet")
  with pytest.raises(ValueError, match="lack"):
    pipeline.make_eval_batches(dict(cfg, data=f"parquet:{tmp_path}/b.parquet"), "train", 4,
                               None)
  with pytest.raises(ValueError, match="randaugment"):
    pipeline._Example(records, dict(cfg, pp_image="decode|randaugment|resize(20)"))  # pylint: disable=protected-access


def _config(**changes):
  user = config_lib.defaults()
  user.total_steps = 1
  user.input.update(tokenizer=TOKENIZER, data="digits_boxes", box_column="boxes",
                    box_text_column="box_texts", max_boxes=4, box_text_len=12)
  user.input.update(changes)
  return user


@pytest.mark.parametrize("changes,match", [
    (dict(box_text_column=None), "input.box_text_column"),
    (dict(max_boxes=0), "input.max_boxes"),
    (dict(box_text_len=True), "input.box_text_len"),
    (dict(box_column=""), "input.box_column"),
    (dict(pp_image="decode|randaugment|resize(32)|value_range(-1,1)"), "randaugment"),
    (dict(tokenizer=None), "input.tokenizer"),
    ({}, "does not read"),  # The default objective (contrastive) has no boxes.
])
def test_config_checks(changes, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.load(_config(**changes))
