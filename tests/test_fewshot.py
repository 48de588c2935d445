"""fewshot evaluator: the closed-form ridge probe against least squares, shot sampling, and
the whole evaluator over the digits data with fake (MultiMAE- and contrastive-like) image
embeddings."""
import jax.numpy as jnp
import numpy as np
import pytest

from big_mm import config as config_lib, evaluators, sharding
from big_mm.evaluators import fewshot
from big_mm.input import pipeline
from conftest import tiny_config


@pytest.mark.parametrize("n,d", [(30, 5), (6, 20)])  # the primal and the dual solve
def test_ridge_equals_least_squares_on_the_augmented_system(n, d):
  rng = np.random.default_rng(n)
  x, y, l2 = rng.normal(size=(n, d)) * 3 + 1, rng.integers(0, 3, n), 7.0
  mean, std, w = fewshot.fit_ridge(x, y, 3, l2)
  # big_vision's design: whitened features and a constant 100, targets in {-1, 1}.
  design = np.concatenate([(x - x.mean(0)) / (x.std(0) + 1e-5), np.full((n, 1), 100.0)], 1)
  targets = np.where(y[:, None] == np.arange(3), 1.0, -1.0)
  # min |design w - targets|^2 + l2 |w|^2 == least squares on [design; sqrt(l2) I].
  a = np.concatenate([design, np.sqrt(l2) * np.eye(d + 1)])
  b = np.concatenate([targets, np.zeros((d + 1, 3))])
  np.testing.assert_allclose(w, np.linalg.lstsq(a, b, rcond=None)[0], rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(mean, x.mean(0))
  np.testing.assert_array_equal(fewshot.predict_ridge((mean, std, w), x),
                                np.argmax(design @ w, axis=1))


def test_separable_features_are_classified_perfectly():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(4, 16)) * 5
  def sample(per_class):
    y = np.repeat(np.arange(4), per_class)
    return centres[y] + rng.normal(size=(len(y), 16)) * 0.1, y
  (x_train, y_train), (x_test, y_test) = sample(20), sample(50)
  out = fewshot.fewshot_accuracies(x_train, y_train, x_test, y_test, shots=(1, 5), l2_reg=2.0**10,
                                   repeats=2, seed=0)
  assert out == {"1shot_accuracy": 1.0, "5shot_accuracy": 1.0}
  # Shuffled labels: no better than chance-ish, so the probe really uses the features.
  wrong = fewshot.fewshot_accuracies(x_train, rng.permutation(y_train), x_test, y_test,
                                     shots=(5,), l2_reg=2.0**10, repeats=2, seed=0)
  assert wrong["5shot_accuracy"] < 0.6


def test_sample_shots_per_class_seeded_and_nested():
  labels = np.array([0] * 6 + [1] * 2 + [2] * 9)
  a = fewshot.sample_shots(labels, (1, 3, 5), seed=4)
  for k, idx in a.items():
    assert np.bincount(labels[idx]).tolist() == [min(k, 6), min(k, 2), min(k, 9)]
    assert len(set(idx)) == len(idx)
  assert set(a[1]) <= set(a[3]) <= set(a[5])
  assert all(np.array_equal(v, fewshot.sample_shots(labels, (1, 3, 5), seed=4)[k])
             for k, v in a.items())
  assert not np.array_equal(a[5], fewshot.sample_shots(labels, (5,), seed=5)[5])


def _features(images):
  """Fake pooled features: 8 x 8 average pooling of the red channel."""
  b = images.shape[0]
  return images[..., 0].reshape(b, 8, 4, 8, 4).mean(axis=(2, 4)).reshape(b, 64)


class _FakeObjective:
  def __init__(self, normalise):
    self.normalise = normalise

  def embed_images(self, params, images):
    z = _features(images) * params["scale"]
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True) if self.normalise else z


def _sklearn_ridge_accuracies(x_train, y_train, x_test, y_test, *, shots, l2_reg, repeats, seed):
  """The documented protocol (big_mm/evaluators/fewshot.py) written independently of it:
  scikit-learn's Ridge on whitened features plus a constant 100, targets in {-1, 1}."""
  from sklearn.linear_model import Ridge
  accuracies = {k: [] for k in shots}
  for r in range(repeats):
    rng = np.random.default_rng(seed + r)
    per_class = [rng.permutation(np.flatnonzero(y_train == c)) for c in range(10)]
    for k in shots:
      idx = np.concatenate([ids[:k] for ids in per_class])
      x = np.asarray(x_train[idx], np.float64)
      mean, std = x.mean(0), x.std(0) + 1e-5
      design = lambda f: np.concatenate(
          [(np.asarray(f, np.float64) - mean) / std, np.full((len(f), 1), 100.0)], axis=1)
      targets = np.where(y_train[idx][:, None] == np.arange(10), 1.0, -1.0)
      probe = Ridge(alpha=l2_reg, fit_intercept=False, solver="svd").fit(design(x), targets)
      accuracies[k].append(np.mean(np.argmax(probe.predict(design(x_test)), 1) == y_test))
  return {f"{k}shot_accuracy": float(np.mean(v)) for k, v in accuracies.items()}


@pytest.mark.parametrize("normalise", [False, True])  # MultiMAE-like, contrastive-like
def test_fewshot_evaluator_on_digits(data_dir, normalise):
  ev = dict(type="fewshot", split="test", train_split="train[:400]", batch_size=64,
            pp_image="decode|resize(32)|value_range(-1,1)", shots=(1, 10), repeats=2, seed=3)
  config = tiny_config(data_dir, evals={"f": ev})
  mesh = sharding.make_mesh(config.mesh)
  objective = _FakeObjective(normalise)
  context = evaluators.EvalContext(config, mesh, objective)
  out = evaluators.build("f", config.evals.f, context)({"scale": 2.0})

  def host(split):
    cfg = evaluators.common.eval_input_config(config, config.evals.f)
    batches = list(pipeline.make_eval_batches(cfg, split, 64, None))
    images = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
    return np.asarray(objective.embed_images({"scale": 2.0}, jnp.asarray(images))), labels

  (x_train, y_train), (x_test, y_test) = host("train[:400]"), host("test")
  expected = _sklearn_ridge_accuracies(x_train, y_train, x_test, y_test, shots=(1, 10),
                                       l2_reg=2.0**10, repeats=2, seed=3)
  assert len(y_test) == 300 and len(np.unique(y_train)) == 10
  assert out == {"eval/f/1shot_accuracy": pytest.approx(expected["1shot_accuracy"], abs=1e-6),
                 "eval/f/10shot_accuracy": pytest.approx(expected["10shot_accuracy"], abs=1e-6),
                 "eval/f/num_examples": 300.0}
  assert out["eval/f/10shot_accuracy"] > 0.6  # pixels of digits are linearly separable-ish


@pytest.mark.parametrize("changes,error", [
    (dict(shots=(0, 5)), r"evals.e.shots entries must be an integer >= 1"),
    (dict(shots=5), r"evals.e.shots must be a non-empty tuple"),
    (dict(l2_reg=0.0), r"evals.e.l2_reg must be a number > 0"),
    (dict(repeats=0), r"evals.e.repeats must be an integer >= 1"),
    (dict(train_split=""), r"evals.e.train_split must be a split name"),
    (dict(l2=1.0), r"'evals.e.l2'.*Did you mean 'l2_reg'"),
])
def test_config_errors(changes, error):
  with pytest.raises(config_lib.ConfigError, match=error):
    config_lib.load(config_lib.ConfigDict(dict(total_steps=1, evals={"e": dict(
        type="fewshot", **changes)})))


def test_config_defaults():
  ev = config_lib.load(config_lib.ConfigDict(dict(total_steps=1, evals={"e": dict(
      type="fewshot")}))).evals.e
  assert (ev.train_split, ev.split, ev.shots, ev.l2_reg, ev.repeats) == (
      "train", "test", (1, 5, 10), 1024.0, 3)
