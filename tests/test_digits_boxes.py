"""data/digits_boxes.py: the built records are consistent (pixels, boxes, captions, referring
expressions) and the splits share no digit image."""
import itertools
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from big_mm.input import boxes
from data import digits_boxes
from data import digits_captions

_NUMBER = {w: i for i, w in enumerate(digits_captions.WORDS)} | {str(i): i for i in range(10)}


def _records(boxes_dir, split, limit=None):
  ds = tfds.data_source("digits_boxes", split=split, data_dir=boxes_dir)
  return [dict(ds[i]) for i in range(len(ds) if limit is None else limit)]


def _resolve(expression, labels, boxes):
  """An independent reader of a referring expression -> the indices of the boxes it fits."""
  m = re.fullmatch(r"the (?:digit )?(\w+)|the (\w+) on the (left|right)|the (left|right)most "
                   r"(\w+)|the (\w+) in the middle", expression)
  assert m, expression
  word = m.group(1) or m.group(2) or m.group(5) or m.group(6)
  same = [i for i, d in enumerate(labels) if d == _NUMBER[word]]
  same.sort(key=lambda i: boxes[i, 1] + boxes[i, 3])
  side = m.group(3) or m.group(4)
  if side == "left":
    return same[:1]
  if side == "right":
    return same[-1:]
  if m.group(6):
    return same[1:2] if len(same) == 3 else []
  return same


@pytest.mark.parametrize("split,limit", [("test", None), ("train", 1500)])
def test_records_are_consistent(boxes_dir, split, limit):
  images, _ = digits_captions.load_digits()
  size = digits_boxes.IMAGE_SIZE
  duplicates = 0
  for ex in _records(boxes_dir, split, limit):
    image, boxes = np.asarray(ex["image"]), np.asarray(ex["boxes"], np.float64)
    labels, ids = [int(x) for x in ex["box_labels"]], [int(x) for x in ex["digit_ids"]]
    n = len(boxes)
    assert image.shape == (size, size, 3) and 2 <= n <= 3
    assert len(labels) == len(ids) == len(ex["box_texts"]) == n
    # Boxes: inside the image, on the pixel grid, SIDE_MIN..SIDE_MAX squares, 1 px apart.
    assert ((boxes >= 0) & (boxes <= 1)).all()
    px = boxes * size
    np.testing.assert_allclose(px, np.round(px), atol=1e-4)
    px = np.round(px).astype(int)
    sides = px[:, 2] - px[:, 0]
    assert (sides == px[:, 3] - px[:, 1]).all()
    assert ((sides >= digits_boxes.SIDE_MIN) & (sides <= digits_boxes.SIDE_MAX)).all()
    for a, b in itertools.combinations(px, 2):
      assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1], (a, b)
    # Left-to-right order, centres MIN_DX apart.
    assert (np.diff(px[:, 1] + px[:, 3]) >= 2 * digits_boxes.MIN_DX).all()
    # The pixels: each box holds its digit's ink (the image re-rendered from the digit ids and
    # boxes is the image), nothing outside the boxes.
    cells = [(t, l, s) for (t, l, _, _), s in zip(px, sides)]
    expected = digits_boxes.render([images[i] for i in ids], cells)
    np.testing.assert_array_equal(image, np.repeat(expected[..., None], 3, -1))
    for t, l, s in cells:
      assert image[t:t + s, l:l + s].max() > 64
    # The caption names the digits left to right, with a direction.
    text = ex["text"].decode()
    assert "left to right" in text
    named = [_NUMBER[w] for w in re.findall(r"\b(\d|" + "|".join(digits_captions.WORDS) + r")\b",
                                            text)]
    assert named == labels, text
    # Each referring expression names exactly its own box.
    for k, expression in enumerate(ex["box_texts"]):
      assert _resolve(expression.decode(), labels, boxes) == [k], (expression, labels)
    duplicates += len(set(labels)) < n
  assert duplicates > 0.1 * (limit or 1000)  # Some expressions need a position word.


def test_labels_match_digit_ids_and_splits_are_disjoint(boxes_dir):
  _, labels = digits_captions.load_digits()
  train_ids, test_ids = digits_captions.split_ids(labels)
  seen = {}
  for split, allowed in (("train", set(train_ids.tolist())), ("test", set(test_ids.tolist()))):
    seen[split] = set()
    for ex in _records(boxes_dir, split):
      ids = [int(i) for i in ex["digit_ids"]]
      assert [int(x) for x in ex["box_labels"]] == [int(labels[i]) for i in ids]
      seen[split].update(ids)
    assert seen[split] <= allowed
  assert not seen["train"] & seen["test"]
  assert len(seen["train"]) > 1000  # The train canvases use most train digits.


def test_sizes_and_determinism(boxes_dir):
  builder = tfds.builder("digits_boxes", data_dir=boxes_dir)
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == \
      digits_boxes.NUM_EXAMPLES
  first = [ex for _, ex in itertools.islice(digits_boxes.generate("test"), 3)]
  again = [ex for _, ex in itertools.islice(digits_boxes.generate("test"), 3)]
  for a, b in zip(first, again):
    assert a["image"] == b["image"] and a["box_texts"] == b["box_texts"]
    np.testing.assert_array_equal(a["boxes"], b["boxes"])
  stored = {int(ex["id"]): ex for ex in _records(boxes_dir, "test")}  # TFDS shuffles on write.
  for a in first:
    b = stored[a["id"]]
    np.testing.assert_array_equal(a["boxes"], b["boxes"])
    assert [t.decode() for t in b["box_texts"]] == a["box_texts"]


def test_tokenizer_covers_the_texts():
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  sp = spm.SentencePieceProcessor(model_file=f"{digits_boxes.__file__[:-3]}_spm.model")
  for _, ex in itertools.islice(digits_boxes.generate("test"), 200):
    for text in [ex["text"]] + ex["box_texts"]:
      for t in (text, boxes.swap_left_right(text)):  # As the pipeline feeds it, flipped too.
        assert sp.unk_id() not in sp.encode(t), t
