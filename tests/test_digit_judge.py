"""The digit judge: tools/train_digit_classifier.py trains it, big_mm.evaluators.digit_judge
reads it back and predicts in numpy as the scikit-learn model it came from."""
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from big_mm.evaluators import digit_judge  # pylint: disable=wrong-import-position
from tools import train_digit_classifier as tool  # pylint: disable=wrong-import-position


def _synthetic(n=120, seed=0):
  """Images in [-1, 1] whose class is which of 4 quadrant-ish blocks is bright, plus noise."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % 4
  images = rng.uniform(-1.0, -0.6, (n, 32, 32, 3)).astype(np.float32)
  for i, c in enumerate(labels):
    r, q = divmod(int(c), 2)
    images[i, 16 * r:16 * r + 16, 16 * q:16 * q + 16] += 1.2
  return images, labels


def test_features_pool_and_range():
  x = np.full((2, 32, 32, 3), -1.0, np.float32)
  x[1, :4, :4] = 3.0  # Out of range (vq decode is unclipped): clipped to 1 first.
  f = digit_judge.features(x, 4)
  assert f.shape == (2, 64)
  np.testing.assert_allclose(f[0], 0.0)
  assert f[1, 0] == 1.0 and np.all(f[1, 1:] == 0.0)


@pytest.mark.parametrize("hidden", [0, 16])
def test_fit_save_load_predicts_as_sklearn(tmp_path, hidden):
  images, labels = _synthetic()
  model, judge = tool.fit(images, labels, pool=4, hidden=hidden)
  path = str(tmp_path / "judge.npz")
  judge.save(path)
  loaded = digit_judge.DigitJudge.load(path)
  test_images, test_labels = _synthetic(n=40, seed=1)
  want = model.predict(digit_judge.features(test_images, 4))
  np.testing.assert_array_equal(loaded.predict(test_images), want)
  assert loaded.predict(test_images).dtype == np.int32
  assert loaded.accuracy(test_images, test_labels) == 1.0
  np.testing.assert_allclose(loaded.logits(test_images), judge.logits(test_images), rtol=1e-6)
  assert loaded.meta["model"] == (f"mlp({hidden}, relu)" if hidden else "logistic_regression")
  assert (loaded.pool, loaded.image_size, loaded.num_classes) == (4, 32, 4)


def test_tool_on_digits(data_dir, tmp_path):
  out = str(tmp_path / "judge.npz")
  assert tool.main(["--out", out, "--data_dir", data_dir, "--hidden", "0"]) == 0
  judge = digit_judge.DigitJudge.load(out)
  assert judge.meta["data"] == "digits_captions" and judge.meta["train_examples"] == 1497
  assert judge.meta["train_accuracy"] > 0.95 and judge.meta["test_accuracy"] > 0.9
  test_x, test_y = tool.load_split("digits_captions", "test", data_dir)
  assert judge.accuracy(test_x, test_y) == judge.meta["test_accuracy"]


def test_bad_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="train_digit_classifier"):
    digit_judge.DigitJudge.load(str(tmp_path / "missing.npz"))
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="not a readable .npz"):
    digit_judge.DigitJudge.load(str(garbage))
  other = tmp_path / "other.npz"
  np.savez(other, weights=np.zeros((3, 3)))
  with pytest.raises(ValueError, match="not a digit judge .npz.*KeyError"):
    digit_judge.DigitJudge.load(str(other))
  images, labels = _synthetic(n=40)
  _, judge = tool.fit(images, labels, hidden=0)
  path = str(tmp_path / "judge.npz")
  judge.save(path)
  with np.load(path) as data:
    arrays = dict(data)
  np.savez(tmp_path / "cut.npz", **{k: v for k, v in arrays.items() if k != "bias_0"})
  with pytest.raises(ValueError, match="bias_0"):
    digit_judge.DigitJudge.load(str(tmp_path / "cut.npz"))
  with pytest.raises(ValueError, match=r"\[B, 32, 32, 3\]"):
    judge.predict(np.zeros((2, 28, 28, 3), np.float32))


def test_cli_errors(tmp_path, capsys):
  assert tool.main([]) == 2  # --out missing.
  assert tool.main(["--out", str(tmp_path / "j.npz"), "--C", "x"]) == 1
  assert "--C must be a number" in capsys.readouterr().err


def test_round_trip_batches_and_code_usage():
  class Tok:  # Codes = the sign of the first channel at 2x2 pixels; decode repeats it.
    def encode(self, x):
      return (x[:, ::16, ::16, 0] > 0).reshape(x.shape[0], -1).astype(np.int32)

    def decode(self, codes):
      return np.repeat(np.repeat(codes.reshape(-1, 2, 2, 1), 16, 1), 16, 2).repeat(3, 3) * 2.0 - 1

  images, _ = _synthetic(n=7)
  recon, codes = tool.round_trip(Tok(), images, batch=3)
  assert recon.shape == images.shape and codes.shape == (7, 4)
  np.testing.assert_array_equal(codes, Tok().encode(images))
  np.testing.assert_array_equal(recon, Tok().decode(codes))
  used, perplexity = tool.code_usage(np.array([0, 0, 1, 3]), 5)
  assert used == 3 and perplexity == pytest.approx(np.exp(1.5 * np.log(2.0)))
