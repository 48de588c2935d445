"""Symile and GRAM losses (big_mm/objectives/higher_order.py) equal straight-loop numpy
references; sharded (8 devices, all_gather) equals local in values and gradients; volume and
score properties."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from big_mm.objectives import higher_order as ho, losses

T = 6.0


def _zs(seed, m, n, d):
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(n, d))
  # Correlate the aligned rows so the positives matter.
  zs = [base] + [rng.normal(size=(n, d)) + 0.7 * base for _ in range(m - 1)]
  return [(z / np.linalg.norm(z, axis=-1, keepdims=True)).astype(np.float32) for z in zs]


def _valid(n, invalid=(1, 6, 7)):
  v = np.ones(n, np.float32)
  v[list(invalid)] = 0
  return v


# ----------------------------------------------------------------------------- numpy references


def _lse(x):
  x = np.asarray(x, np.float64)
  return x.max() + np.log(np.exp(x - x.max()).sum())


def _np_symile(zs, t, valid, negatives, perms=None):
  """symile/loss.py `Symile.forward`, row by row: candidates of anchor row i are the shuffled
  tuples (perms[m, :, j]) with the aligned tuple at j = i ("n") or every tuple ("n2")."""
  zs = [np.asarray(z, np.float64) for z in zs]
  n, n_mod = len(zs[0]), len(zs)
  rows = [i for i in range(n) if valid[i]]
  per_anchor = []
  for m in range(n_mod):
    others = [z for r, z in enumerate(zs) if r != m]
    ces = []
    for i in rows:
      if negatives == "n":
        tuples = [[i] * (n_mod - 1) if j == i else [perms[m, k, j] for k in range(n_mod - 1)]
                  for j in range(n)]
      else:
        tuples = itertools.product(range(n), repeat=n_mod - 1)
      logits = [t * np.sum(zs[m][i] * np.prod([o[j] for o, j in zip(others, tup)], axis=0))
                for tup in tuples if all(valid[j] for j in tup)]
      pos = t * np.sum(np.prod([z[i] for z in zs], axis=0))
      ces.append(_lse(logits) - pos)
    per_anchor.append(np.mean(ces) if ces else 0.0)
  return float(np.mean(per_anchor))


def _np_volume(vectors, eps=ho.VOLUME_EPS):
  x = np.stack(vectors)
  return np.sqrt(max(np.linalg.det(x @ x.T), 0.0) + eps)


def _np_gram(zs, t, valid, anchor, ls):
  """GRAM model/gram.py `forward_ret`: CE(-t vol(anchor_i, others_j)) both ways, smoothed."""
  zs = [np.asarray(z, np.float64) for z in zs]
  rows = [i for i in range(len(zs[0])) if valid[i]]
  others = [z for m, z in enumerate(zs) if m != anchor]
  vol = lambda a, c: _np_volume([zs[anchor][a]] + [o[c] for o in others])

  def ce(logits, pos):
    nll = _lse(logits) - np.asarray(logits)
    return (1 - ls) * (_lse(logits) - pos) + ls * np.mean(nll)

  fwd = [ce([-t * vol(i, j) for j in rows], -t * vol(i, i)) for i in rows]
  bwd = [ce([-t * vol(k, i) for k in rows], -t * vol(i, i)) for i in rows]
  return float((np.mean(fwd) + np.mean(bwd)) / 2) if rows else 0.0


@pytest.mark.parametrize("negatives,m", [("n", 3), ("n2", 3), ("n", 2), ("n2", 4)])
def test_symile_matches_numpy(negatives, m):
  n = 8 if m < 4 else 5
  zs, valid, rng = _zs(0, m, n, 6), _valid(n, (1, 3)), jax.random.PRNGKey(3)
  loss = jax.jit(lambda zs, valid: (ho.symile_loss(zs, T, negatives=negatives, rng=rng,
                                                   valid=valid), ho.symile_permutations(rng, m, n)))
  got, perms = loss(zs, valid)
  want = _np_symile(zs, T, valid, negatives, np.asarray(perms))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  if negatives == "n":  # all valid: the paper's n x n logits with the positive on the diagonal
    want = _np_symile(zs, T, np.ones(n), negatives, np.asarray(perms))
    np.testing.assert_allclose(float(loss(zs, np.ones(n))[0]), want, rtol=1e-5)


@pytest.mark.parametrize("anchor,ls", [(0, 0.1), (2, 0.0)])
def test_gram_matches_numpy(anchor, ls):
  zs, valid = _zs(1, 3, 8, 6), _valid(8)
  got = jax.jit(lambda zs: ho.gram_loss(zs, T, anchor=anchor, valid=valid,
                                        label_smoothing=ls))(zs)
  np.testing.assert_allclose(float(got), _np_gram(zs, T, valid, anchor, ls), rtol=1e-4)


# ----------------------------------------------------------------------------- sharded == local


def _value_and_grad(fn, mesh=None):
  """jit'd (zs, t, valid) -> (loss, (dzs, dt)), inputs placed on `mesh`'s batch axes."""
  f = jax.jit(jax.value_and_grad(lambda zs, t, valid: fn(zs, t, valid=valid, mesh=mesh), (0, 1)))
  if mesh is None:
    return f
  sh, rep = NamedSharding(mesh, P(("data", "fsdp"))), NamedSharding(mesh, P())
  return lambda zs, t, valid: f([jax.device_put(z, sh) for z in zs], jax.device_put(t, rep),
                                jax.device_put(valid, sh))


@pytest.mark.parametrize("loss", ["symile_n", "symile_n2", "gram"])
def test_all_gather_equals_local(loss):
  """8 devices (data 4 x fsdp 2) equal 1, with invalid rows; no valid row: 0, finite grads."""
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  zs, valid, t = _zs(2, 3, 16, 8), jnp.asarray(_valid(16, (0, 5, 9, 10))), jnp.float32(T)
  if loss == "gram":
    fn = functools.partial(ho.gram_loss, anchor=1)
  else:
    fn = functools.partial(ho.symile_loss, negatives=loss.split("_")[1],
                           rng=jax.random.PRNGKey(4))
  local = _value_and_grad(functools.partial(fn, strategy="local"))
  sharded = _value_and_grad(functools.partial(fn, strategy="all_gather"), mesh)
  want_v, want_g = local(zs, t, valid)
  got_v, got_g = sharded(zs, t, valid)
  np.testing.assert_allclose(got_v, want_v, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  for i in (0, 5, 9, 10):  # invalid rows get no gradient
    assert all(float(jnp.abs(g[i]).max()) == 0.0 for g in got_g[0])
  for f in (local, sharded):
    v, g = f(zs, t, jnp.zeros(16))
    assert float(v) == 0.0
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))


# ----------------------------------------------------------------------------- properties


def test_volume_orthonormal_collinear_and_finite_grads():
  eye = np.eye(5, dtype=np.float32)
  z, y = _zs(6, 2, 5, 5)
  orthonormal, collinear = [eye, np.roll(eye, 1, 0), np.roll(eye, 2, 0)], [z, -z, z]

  @jax.jit
  def run(orthonormal, pair, collinear):
    grads = [jax.grad(f)(collinear) for f in (lambda zs: jnp.sum(ho.gram_volume(zs)),
                                              lambda zs: ho.gram_loss(zs, T))]
    return ho.gram_volume(orthonormal), ho.gram_volume(pair), ho.gram_volume(collinear), grads

  vol_orthonormal, vol_pair, vol_collinear, grads = run(orthonormal, [z, y], collinear)
  np.testing.assert_allclose(vol_orthonormal, 1.0, rtol=1e-6)
  # M = 2: |sin| of the angle.
  np.testing.assert_allclose(vol_pair, np.sqrt(1 - np.sum(z * y, -1) ** 2), atol=1e-4)
  assert float(np.max(vol_collinear)) < 1e-3
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_symile_n_deterministic_in_rng():
  zs = _zs(8, 3, 8, 4)
  loss = jax.jit(lambda zs, rng: ho.symile_loss(zs, T, rng=rng))
  a = float(loss(zs, jax.random.PRNGKey(1)))
  assert a == float(loss(zs, jax.random.PRNGKey(1)))
  assert a != float(loss(zs, jax.random.PRNGKey(2)))


def test_symile_two_modalities_n2_is_clip():
  z1, z2 = _zs(9, 2, 8, 4)
  got, want = jax.jit(lambda z1, z2: (ho.symile_loss([z1, z2], T, negatives="n2"),
                                      losses.softmax_loss(z1, z2, T)))(z1, z2)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_scores():
  zs = _zs(10, 3, 6, 4)
  s, m, g, v = jax.jit(lambda zs: (ho.symile_scores(zs[:2], zs[2][:5]), ho.mip(zs),
                                   ho.gram_scores(zs[:2], zs[2]), ho.gram_volume(zs)))(zs)
  assert s.shape == (6, 5) and g.shape == (6, 6)
  np.testing.assert_allclose(np.diag(s), m[:5], rtol=1e-5)
  np.testing.assert_allclose(np.diag(g), -v, rtol=1e-4)


def test_invalid_arguments():
  zs = _zs(11, 3, 4, 4)
  with pytest.raises(ValueError, match="at least 2"):
    ho.symile_loss(zs[:1], T, negatives="n2")
  with pytest.raises(ValueError, match="rng="):
    ho.symile_loss(zs, T)
  with pytest.raises(ValueError, match="negatives"):
    ho.symile_loss(zs, T, negatives="n3")
  with pytest.raises(ValueError, match="strategy"):
    ho.gram_loss(zs, T, strategy="ring")
  with pytest.raises(ValueError, match="anchor"):
    ho.gram_loss(zs, T, anchor=3)
