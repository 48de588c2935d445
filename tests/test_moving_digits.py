"""data/moving_digits.py: motion paths (reversed classes share their frames), captions and
labels, held-out digit images, mp4 encoding, and a small build read back through TFDS and
big_mm's source reader."""
import glob
import os

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow_datasets as tfds

from big_mm.input import sources
from data import digits_captions, moving_digits as md

SIZES = {"train": 12, "test": 8}
PAIRS = ((md.LEFT, md.RIGHT), (md.UP, md.DOWN), (md.CLOCKWISE, md.ANTICLOCKWISE))


def _images(ids=(3, 7)):
  return [md.digit_image(digits_captions.load_digits()[0][i]) for i in ids]


def _centres(frames):
  """(x, y) centre of mass per frame, in pixels."""
  w = frames[..., 0].astype(np.float64)
  total = w.sum((1, 2))
  return (w.sum(1) @ np.arange(md.CANVAS)) / total, (w.sum(2) @ np.arange(md.CANVAS)) / total


def test_render_centres_and_turns_clockwise():
  bar = np.zeros((14, 14), np.uint8)
  bar[:4, 5:9] = 255  # A block at the top.
  ys, xs = np.nonzero(md.render(bar, 16, 16, 0) > 127)
  assert (xs.mean(), ys.mean()) == (15.5, 10.5)
  ys, xs = np.nonzero(md.render(bar, 16, 16, 90) > 127)  # Clockwise: the top goes right.
  assert (xs.mean(), ys.mean()) == (20.5, 15.5)


@pytest.mark.parametrize("seed", range(3))
def test_reversed_classes_show_the_same_frames_backwards(seed):
  images = _images()
  for a, b in PAIRS:
    pa, pb = (md.draw_path(c, np.random.default_rng(seed)) for c in (a, b))
    fa, fb = md.clip_frames(pa, images), md.clip_frames(pb, images)
    np.testing.assert_array_equal(fa, fb[::-1])
    assert sorted(f.tobytes() for f in fa) == sorted(f.tobytes() for f in fb)  # Same frames.
    assert len({f.tobytes() for f in fa}) == md.NUM_FRAMES  # ...and they do move.
  x, y = _centres(md.clip_frames(md.draw_path(md.LEFT, np.random.default_rng(seed)), images))
  assert np.all(np.diff(x) < 0) and np.ptp(y) < 0.5
  x, y = _centres(md.clip_frames(md.draw_path(md.UP, np.random.default_rng(seed)), images))
  assert np.all(np.diff(y) < 0) and np.ptp(x) < 0.5
  angle = md.draw_path(md.CLOCKWISE, np.random.default_rng(seed))[:, 3]
  assert np.all(np.diff(angle) > 0) and 120 <= angle[-1] - angle[0] <= 240


def test_bouncing_and_in_turn_reversals_are_equally_likely():
  """Their reversal is a clip of the same class (in turn: the digits swapped) drawn with the
  same probability, so neither one frame nor the set of frames tells which way it ran."""
  walls, switches = set(), set()
  for seed in range(200):
    path = md.draw_path(md.BOUNCING, np.random.default_rng(seed))
    assert np.all(np.abs(path[:, 1:3] - md.CANVAS / 2) <= md.CANVAS / 2 - md.DIGIT_SIZE / 2)
    walls.add(int(np.argmax(np.abs(path[:, 1:3] - md.CANVAS / 2).max(1))))  # Frame at the wall.
    turn = md.draw_path(md.IN_TURN, np.random.default_rng(seed))
    assert set(turn[:, 0]) == {0, 1} and np.all(np.diff(turn[:, 0]) >= 0)
    switches.add(int(np.argmax(turn[:, 0])))
  assert walls == {md.NUM_FRAMES - 1 - k for k in walls} == set(range(4, 12))
  assert switches == {md.NUM_FRAMES - k for k in switches} == set(range(5, 12))
  path = md.draw_path(md.IN_TURN, np.random.default_rng(0))
  swapped = path[::-1].copy()
  swapped[:, 0] = 1 - swapped[:, 0]
  images = _images()
  np.testing.assert_array_equal(md.clip_frames(path, images)[::-1],
                                md.clip_frames(swapped, images[::-1]))


def test_plans_labels_captions_and_held_out_images():
  _, labels = digits_captions.load_digits()
  train_ids, test_ids = digits_captions.split_ids(labels)
  prompts = {t.format(c) for t in md.ZEROSHOT_TEMPLATES for c in md.CLASS_NAMES}
  seen = {}
  for split, ids in (("train", train_ids), ("test", test_ids)):
    for i in range(64):
      label, image_ids, digits, text, path = md.plan(split, i)
      assert label == i % len(md.LABELS) and path.shape == (md.NUM_FRAMES, 4)
      assert digits == [int(labels[j]) for j in image_ids] and set(image_ids) <= set(ids)
      assert len(digits) == (2 if label == md.IN_TURN else 1)
      names = dict(n=digits[0], w=digits_captions.WORDS[digits[0]])
      if label == md.IN_TURN:
        assert digits[0] != digits[1]
        names.update(n2=digits[1], w2=digits_captions.WORDS[digits[1]])
      assert text in [t.format(**names) for t in md.CAPTION_TEMPLATES[label]]
      assert text not in prompts
      seen.setdefault(split, set()).update(image_ids)
      np.testing.assert_array_equal(path, md.plan(split, i)[4])
  assert not seen["train"] & seen["test"]
  ex, again = md.example("test", 5), md.example("test", 5)
  assert ex["video"] == again["video"] and ex["text"] == again["text"]
  assert ex["id"] == 1_000_005 and ex["label"] == 5 and ex["digits"].tolist()[1] == -1
  assert ex["image_ids"].tolist() == md.plan("test", 5)[1] + [-1]


def test_mp4_round_trip_is_deterministic_and_close():
  label, image_ids, _, _, path = md.plan("train", 4)
  frames = md.clip_frames(path, [md.digit_image(digits_captions.load_digits()[0][i])
                                 for i in image_ids])
  video = md.to_mp4(frames)
  assert video == md.to_mp4(frames) and video[4:8] == b"ftyp"
  decoded = md.decode(video)
  assert decoded.shape == (md.NUM_FRAMES, md.CANVAS, md.CANVAS, 3)
  assert np.abs(decoded.astype(int) - frames).mean() < 1.0


def test_tokenizer_covers_captions_and_prompts():
  sp = spm.SentencePieceProcessor(
      model_file=os.path.join(os.path.dirname(md.__file__), "moving_digits_spm.model"))
  texts = [md.plan("train", i)[3] for i in range(16)]
  texts += [t.format(c) for t in md.ZEROSHOT_TEMPLATES for c in md.CLASS_NAMES]
  for text in texts:
    ids = sp.encode(text)
    assert sp.unk_id() not in ids and len(ids) <= 16 and sp.decode(ids) == text


def test_small_build_is_deterministic_and_reads_back(tmp_path):
  dirs = [str(tmp_path / d) for d in ("a", "b")]
  for d in dirs:
    md.build(d, sizes=SIZES)
  files = [sorted(glob.glob(os.path.join(d, "moving_digits", "*", "*.array_record*")))
           for d in dirs]
  assert len(files[0]) == 2
  for fa, fb in zip(*files):
    assert open(fa, "rb").read() == open(fb, "rb").read()
  builder = tfds.builder("moving_digits", data_dir=dirs[0])
  assert builder.info.features["label"].names == list(md.LABELS)
  for split, n in SIZES.items():
    reader = sources.open_source("moving_digits", split, dirs[0])
    assert len(reader) == n
    records = sorted((reader[k] for k in range(n)), key=lambda r: r["id"])
    for i, r in enumerate(records):
      ex = md.example(split, i)
      assert (r["id"], r["label"], r["text"], r["video"]) == (
          ex["id"], ex["label"], ex["text"], ex["video"])
      np.testing.assert_array_equal(r["digits"], ex["digits"])
      np.testing.assert_array_equal(r["image_ids"], ex["image_ids"])
    assert md.decode(records[0]["video"]).shape == (md.NUM_FRAMES, md.CANVAS, md.CANVAS, 3)
