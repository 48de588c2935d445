"""Point clouds: the pp ops of big_mm/input/points.py and the PointTransformer tower."""
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_mm.input import points, preprocess
from big_mm.input.preprocess import BadRecord
from big_mm.input.sources import SKIP_REASONS
from big_mm.models.points import PointTransformer, farthest_point_sample
from big_mm.models.towers import Towers

TINY = dict(width=16, depth=1, mlp_dim=32, num_heads=2, num_groups=8, group_size=8)
TRAIN_PP = ("sample_points(64)|normalize_points|random_rotate_points('so3')|"
            "random_scale_points(0.8, 1.25)|jitter_points(0.01, 0.05)")


def _run(pp, value, seed=0):
  return preprocess.apply_pp(preprocess.parse_pp(pp, "points"), value,
                             np.random.default_rng(seed))


def _cloud(n=100, seed=0, channels=3):
  return np.random.default_rng(seed).normal(size=(n, channels)).astype(np.float32) * 3 + 5


def test_ops_shapes_and_output_shape():
  assert preprocess.output_shape(TRAIN_PP) == (64, 3)
  assert preprocess.output_shape("fps_points(32)|normalize_points") == (32, 3)
  assert preprocess.output_shape("normalize_points") is None
  for value in (_cloud(100, channels=6), _cloud(10)):  # normals dropped; short: repeats
    out = _run(TRAIN_PP, value)
    assert out.shape == (64, 3) and out.dtype == np.float32
  buf = io.BytesIO()
  np.save(buf, _cloud(50))
  assert _run("fps_points(32)", buf.getvalue()).shape == (32, 3)
  assert _run("fps_points(32)", _cloud(5)).shape == (32, 3)
  with pytest.raises(ValueError, match="axis must be 'z' or 'so3'"):
    preprocess.parse_pp("random_rotate_points('y')")


def test_normalize_rotate_scale_jitter():
  x = _run("normalize_points", _cloud())
  np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(x, axis=1).max(), 1, rtol=1e-5)
  for axis in ("z", "so3"):
    y = _run(f"random_rotate_points('{axis}')", x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), atol=1e-5)
    assert np.abs(y - x).max() > 0.1
    if axis == "z":
      np.testing.assert_array_equal(y[:, 2], x[:, 2])
  r = points.random_rotation("so3", np.random.default_rng(3))
  np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
  assert np.isclose(np.linalg.det(r), 1)
  scaled = _run("random_scale_points(0.5, 0.6)", x)
  ratio = np.linalg.norm(scaled, axis=1) / np.linalg.norm(x, axis=1)
  assert np.ptp(ratio) < 1e-5 and 0.5 <= ratio[0] <= 0.6
  d = _run("jitter_points(1.0, 0.05)", x) - x
  assert 0.04 < np.abs(d).max() <= 0.05 + 1e-6


def test_ops_are_deterministic_given_the_rng():
  a, b, c = (_run(TRAIN_PP, _cloud(), seed) for seed in (7, 7, 8))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  sub = _run("sample_points(100, replace_if_short=False)", _cloud(100))  # a permutation
  np.testing.assert_array_equal(np.sort(sub, 0), np.sort(_cloud(100), 0))


def test_fps_picks_spread_points():
  cluster = np.random.default_rng(0).normal(size=(200, 3)) * 0.01
  outliers = np.array([[5, 0, 0], [-5, 0, 0], [0, 5, 0], [0, 0, -5]], np.float32)
  cloud = np.concatenate([cluster, outliers]).astype(np.float32)
  perm = np.random.default_rng(1).permutation(len(cloud))
  picked = _run("fps_points(5)", cloud[perm])
  assert {tuple(p) for p in outliers.tolist()} <= {tuple(p) for p in picked.tolist()}
  idx = np.asarray(farthest_point_sample(jnp.asarray(cloud[perm][None]), 5))[0]
  assert set(perm[idx][:4]) == set(range(200, 204))  # the jitted FPS agrees
  np.testing.assert_array_equal(np.sort(perm[idx]), np.sort(perm[points.farthest_points(
      cloud[perm], 5)]))


@pytest.mark.parametrize("value, match", [
    (np.zeros((5, 2)), r"shape \(5, 2\)"), (np.zeros((0, 3)), "shape"),
    (np.array([[0, 0, np.nan]]), "NaN"), (b"not npy", "not a .npy"), ("abc", "numeric"),
])
def test_bad_values_are_bad_points(value, match):
  assert "bad_points" in SKIP_REASONS
  with pytest.raises(BadRecord, match=match) as e:
    _run("normalize_points", value)
  assert e.value.reason == "bad_points"
  with pytest.raises(BadRecord, match="5 points, sample_points needs 8") as e:
    _run("sample_points(8, replace_if_short=False)", _cloud(5))


def test_tower_is_invariant_to_point_order():
  x = jnp.asarray(np.stack([_cloud(64, 1), _cloud(64, 2)]))
  perm = np.random.default_rng(0).permutation(64)
  model = PointTransformer(**TINY, pool="tok", num_classes=8, head_zeroinit=False)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"]
  apply = jax.jit(lambda x: model.apply({"params": params}, x))
  y, out = apply(x)
  y_perm, _ = apply(x[:, perm])
  assert y.shape == (2, 8) and out["centres"].shape == (2, 8, 3)
  assert float(jnp.abs(y).max()) > 1e-3
  np.testing.assert_allclose(y_perm, y, atol=1e-5)
  assert float(jnp.abs(y[0] - y[1]).max()) > 1e-3  # different clouds, different outputs
  with pytest.raises(ValueError, match="num_groups=100"):
    PointTransformer(**dict(TINY, num_groups=100)).init(jax.random.PRNGKey(0), x)


def test_towers_points_and_text_give_normalised_embeddings():
  model = Towers(towers={"points": dict(TINY, pool="max"),
                         "text": dict(width=16, depth=1, mlp_dim=32, num_heads=2, vocab_size=30)},
                 out_dim=8)
  inputs = {"points": jnp.asarray(np.stack([_cloud(32, i) for i in range(3)])),
            "text": jnp.ones((3, 5), jnp.int32)}
  params = jax.jit(model.init)(jax.random.PRNGKey(0), inputs)["params"]
  assert {"pts", "txt", "t", "b"} <= set(params)
  z, out = jax.jit(model.apply)({"params": params}, inputs)
  assert z["points"].shape == (3, 8) and "pts/pre_logits" in out
  np.testing.assert_allclose(jnp.linalg.norm(z["points"], axis=-1), 1, rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(z["text"], axis=-1), 1, rtol=1e-5)
