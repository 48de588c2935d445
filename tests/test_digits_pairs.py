"""The `digits_pairs` compositional demo dataset (data/digits_pairs.py)."""
import io
from collections import Counter

import numpy as np
from PIL import Image
import pytest

from data import digits_captions, digits_pairs


@pytest.fixture(scope="module")
def small_splits():
  """Both splits at 200 pairs each (the generator, without the TFDS writer)."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(digits_pairs.PAIRS_PER_SPLIT, "train", 200)
    mp.setitem(digits_pairs.PAIRS_PER_SPLIT, "test", 200)
    return {s: list(digits_pairs.generate(s)) for s in ("train", "test")}


def test_images_show_the_named_digits_in_order(small_splits):
  images, labels = digits_captions.load_digits()
  train_ids, test_ids = digits_captions.split_ids(labels)
  for split, ids in (("train", train_ids), ("test", test_ids)):
    for _, ex in small_splits[split][:20]:
      assert ex["label"] == 10 * ex["left"] + ex["right"]
      pixels = np.asarray(Image.open(io.BytesIO(ex["image"])))[..., 0].astype(float)
      assert pixels.shape == (32, 32)
      # Each half is the nearest (in pixels) of the split's digits of the named class: the
      # digit images come from that split only.
      for half, digit in ((pixels[8:24, :16], ex["left"]), (pixels[8:24, 16:], ex["right"])):
        small = np.asarray(Image.fromarray(half.astype(np.uint8)).resize((8, 8)), float)
        dist = np.abs(images * (255 / 16) - small).reshape(len(images), -1).mean(1)
        assert labels[np.argmin(dist)] == digit
        assert np.min(dist[ids]) <= np.min(dist) + 1e-9


def test_captions_name_both_digits_in_order_and_never_use_a_prompt(small_splits):
  prompts = {p for per_class in digits_pairs.class_prompts() for p in per_class}
  assert len(digits_pairs.class_prompts()) == 100
  for _, ex in small_splits["train"] + small_splits["test"]:
    text = ex["text"]
    assert text not in prompts
    names = [(str(d), digits_pairs.WORDS[d]) for d in (ex["left"], ex["right"])]
    words = text.replace(",", "").split()
    found = [i for i, w in enumerate(words) for n in names[0] if w == n][:1] + [
        i for i, w in enumerate(words) for n in names[1] if w == n][-1:]
    assert len(found) == 2, text
    left_first = found[0] < found[1] or ex["left"] == ex["right"]
    assert left_first == ("to the right of" not in text) or ex["left"] == ex["right"], text


def test_classes_balanced_and_generation_deterministic(small_splits):
  counts = Counter(ex["label"] for _, ex in small_splits["train"])
  assert set(counts) == set(range(100)) and set(counts.values()) == {2}
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(digits_pairs.PAIRS_PER_SPLIT, "test", 200)
    again = list(digits_pairs.generate("test"))
  assert again == small_splits["test"]


def test_wide_canvas_holds_the_same_pairs_at_full_digit_size(small_splits):
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(digits_pairs.PAIRS_PER_SPLIT, "test", 200)
    wide = list(digits_pairs.generate("test", wide=True))
  for (_, square), (_, ex) in zip(small_splits["test"][:10], wide[:10]):
    assert {k: v for k, v in ex.items() if k != "image"} == {
        k: v for k, v in square.items() if k != "image"}
    assert Image.open(io.BytesIO(ex["image"])).size == (64, 32)  # (width, height)
