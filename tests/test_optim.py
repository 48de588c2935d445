"""Tests for big_mm.optim: optimizer chain, schedules, clipping, wd masks, lr_mults/freezing."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from big_mm import optim


def _params(seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  return {
      "img": {"Dense_0": {"kernel": jax.random.normal(k[0], (4, 3)),
                          "bias": jax.random.normal(k[1], (3,))}},
      "txt": {"Dense_0": {"kernel": jax.random.normal(k[2], (3, 5)),
                          "bias": jax.random.normal(k[3], (5,))}},
      "t": jax.random.normal(k[4], (1,)),
  }


def _grads(params, seed=1):
  leaves, treedef = jax.tree.flatten(params)
  ks = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, l.shape) for k, l in zip(ks, leaves)])


def _cfg(**kw):
  cfg = {"name": "adamw", "lr": 0.1, "b1": 0.9, "b2": 0.99, "eps": 1e-8, "wd": 0.0,
         "schedule": {"name": "constant"}}
  cfg.update(kw)
  return cfg


def _step(tx, params, grads, state=None):
  state = tx.init(params) if state is None else state
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), updates, state


def _state_arrays(state):
  return [x for x in jax.tree.leaves(state) if hasattr(x, "shape")]


def _find(state, cls):
  found = []
  def visit(x):
    if isinstance(x, cls):
      found.append(x)
    elif isinstance(x, (tuple, list)):
      for y in x:
        visit(y)
    elif isinstance(x, dict):
      for y in x.values():
        visit(y)
  visit(state)
  return found


# --- adamw ------------------------------------------------------------------
def test_adamw_matches_optax_reference():
  params = _params()
  cfg = _cfg(wd=0.05, clip_norm=None,
             schedule={"name": "cosine", "warmup_steps": 2, "end_lr_fraction": 0.1})
  tx, sched = optim.make_optimizer(cfg, params, total_steps=6)
  ref_sched = optax.warmup_cosine_decay_schedule(0.0, 0.1, 2, 6, end_value=0.01)
  mask = jax.tree_util.tree_map_with_path(lambda p, _: p[-1].key == "kernel", params)
  ref = optax.adamw(ref_sched, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.05, mask=mask)
  p, s = params, tx.init(params)
  rp, rs = params, ref.init(params)
  for i in range(5):
    g = _grads(params, seed=10 + i)
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
    ru, rs = ref.update(g, rs, rp)
    rp = optax.apply_updates(rp, ru)
    np.testing.assert_allclose(sched(i), ref_sched(i), rtol=1e-6, atol=1e-9)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p, rp)
  # Sanity: params did move.
  assert not np.allclose(p["txt"]["Dense_0"]["kernel"], params["txt"]["Dense_0"]["kernel"])


def test_wd_only_on_kernels():
  params = _params()
  zeros = jax.tree.map(jnp.zeros_like, params)  # adam update of a zero grad is exactly 0
  tx, _ = optim.make_optimizer(_cfg(wd=0.5), params, total_steps=10)
  _, u, _ = _step(tx, params, zeros)
  for tower in ("img", "txt"):
    np.testing.assert_allclose(u[tower]["Dense_0"]["kernel"],
                               -0.1 * 0.5 * params[tower]["Dense_0"]["kernel"], rtol=1e-6)
    np.testing.assert_array_equal(u[tower]["Dense_0"]["bias"], 0.0)
  np.testing.assert_array_equal(u["t"], 0.0)
  # A custom mask decays only what it matches.
  tx, _ = optim.make_optimizer(_cfg(wd=0.5, wd_mask=r"txt/.*"), params, total_steps=10)
  _, u, _ = _step(tx, params, zeros)
  np.testing.assert_array_equal(u["img"]["Dense_0"]["kernel"], 0.0)
  np.testing.assert_allclose(u["txt"]["Dense_0"]["bias"],
                             -0.05 * params["txt"]["Dense_0"]["bias"], rtol=1e-6)


# --- lr_mults / freezing ----------------------------------------------------
def test_lr_mults_first_match_wins():
  params = _params()
  cfg = _cfg(lr_mults=((r"img/.*", 0.0), (r".*/kernel", 2.0), (r".*", 1.0)))
  mults = optim.lr_mult_tree(cfg, params)
  assert mults["img"]["Dense_0"]["kernel"] == 0.0  # first rule wins over the kernel rule
  assert mults["txt"]["Dense_0"]["kernel"] == 2.0
  assert mults["txt"]["Dense_0"]["bias"] == 1.0 and mults["t"] == 1.0
  frozen = optim.frozen_mask(cfg, params)
  assert frozen["img"]["Dense_0"]["bias"] and not frozen["txt"]["Dense_0"]["bias"]
  assert not frozen["t"]
  table = optim.describe(cfg, params)
  assert "img/.*" in table and "frozen" in table
  assert "15" in table  # img: 12 + 3 params


def test_lr_mults_uncovered_params_error():
  params = _params()
  cfg = _cfg(lr_mults=((r"img/.*", 1.0), (r"txt/.*/kernel", 1.0)))
  with pytest.raises(ValueError) as e:
    optim.make_optimizer(cfg, params, total_steps=10)
  msg = str(e.value)
  assert "txt/Dense_0/bias" in msg and "\n  t\n" in msg + "\n"
  assert "img/Dense_0/kernel" not in msg.split("Rules:")[0]
  assert "txt/.*/kernel" in msg  # the rules are listed


def test_frozen_params_unchanged_and_stateless():
  params = _params()
  cfg = _cfg(wd=0.1, lr_mults=((r"img/.*", 0.0), (r".*", 1.0)))
  tx, _ = optim.make_optimizer(cfg, params, total_steps=10)
  p, state = params, tx.init(params)
  for i in range(3):
    p, _, state = _step(tx, p, _grads(params, seed=i), state)
  jax.tree.map(np.testing.assert_array_equal, p["img"], params["img"])
  assert not np.allclose(p["txt"]["Dense_0"]["kernel"], params["txt"]["Dense_0"]["kernel"])
  # Adam state: mu + nu for the trainable params only (3*5 + 5 + 1 = 21 each) plus counters.
  n_state = sum(x.size for x in _state_arrays(state))
  n_scalars = sum(1 for x in _state_arrays(state) if x.size == 1 and x.ndim == 0)
  assert n_state - n_scalars == 2 * 21
  tx_all, _ = optim.make_optimizer(_cfg(wd=0.1), params, total_steps=10)
  all_state = tx_all.init(params)
  n_all = sum(x.size for x in _state_arrays(all_state))
  assert n_all - n_scalars == 2 * (21 + 15)


def test_lr_mult_half_halves_update():
  params = _params()
  g = _grads(params)
  for name in ("adamw", "adafactor"):
    base = _cfg(name=name, wd=0.3)
    half = _cfg(name=name, wd=0.3, lr_mults=((r"txt/Dense_0/kernel", 0.5), (r".*", 1.0)))
    _, u1, _ = _step(optim.make_optimizer(base, params, 10)[0], params, g)
    _, u2, _ = _step(optim.make_optimizer(half, params, 10)[0], params, g)
    k1, k2 = u1["txt"]["Dense_0"]["kernel"], u2["txt"]["Dense_0"]["kernel"]
    assert np.abs(k1).min() > 0
    np.testing.assert_allclose(k2, 0.5 * k1, rtol=1e-6)
    np.testing.assert_allclose(u2["img"]["Dense_0"]["kernel"], u1["img"]["Dense_0"]["kernel"])


# --- schedules --------------------------------------------------------------
@pytest.mark.parametrize("name,expected", [
    # steps: 0, 5 (mid warmup), 10 (warmup end), 60 (middle of decay), 110 (end)
    ("cosine", [0.0, 0.5, 1.0, 0.55, 0.1]),
    ("linear", [0.0, 0.5, 1.0, 0.55, 0.1]),
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0]),
    ("rsqrt", [0.0, 0.5, 1.0, (100 / 150) ** 0.5, (100 / 200) ** 0.5]),
])
def test_schedules(name, expected):
  sched_cfg = {"name": name, "warmup_steps": 10, "end_lr_fraction": 0.1, "timescale": 100}
  _, sched = optim.make_optimizer(_cfg(lr=2.0, schedule=sched_cfg), _params(), total_steps=110)
  got = [float(sched(s)) for s in (0, 5, 10, 60, 110)]
  np.testing.assert_allclose(got, [2.0 * e for e in expected], rtol=1e-5, atol=1e-7)


def test_schedule_extras():
  # cosine quarter point; rsqrt cooldown to 0; no warmup starts at lr.
  s = optim.make_schedule({"name": "cosine"}, 1.0, 100)
  np.testing.assert_allclose([float(s(0)), float(s(25)), float(s(100))],
                             [1.0, 0.5 * (1 + np.cos(np.pi / 4)), 0.0], atol=1e-6)
  s = optim.make_schedule({"name": "rsqrt", "timescale": 100, "cooldown_steps": 20}, 1.0, 100)
  np.testing.assert_allclose([float(s(80)), float(s(90)), float(s(100))],
                             [(100 / 180) ** 0.5, 0.5 * (100 / 190) ** 0.5, 0.0], rtol=1e-5)
  with pytest.raises(ValueError, match="cosine"):
    optim.make_schedule({"name": "cosin"}, 1.0, 100)


# --- clipping ---------------------------------------------------------------
def test_clip_by_global_norm_over_trainable_only():
  params = _params()
  g = jax.tree.map(lambda x: jnp.full_like(x, 3.0), params)
  g["img"]["Dense_0"]["kernel"] = jnp.full((4, 3), 1e3)  # frozen: must not enter the norm
  cfg = _cfg(clip_norm=1.0, lr_mults=((r"img/Dense_0/kernel", 0.0), (r".*", 1.0)))
  tx, _ = optim.make_optimizer(cfg, params, total_steps=10)
  _, _, state = _step(tx, params, g)
  (adam,) = _find(state, optax.ScaleByAdamState)
  mu = [x for x in jax.tree.leaves(adam.mu)]
  # mu after one step = (1 - b1) * clipped grad; trainable grad norm 3*sqrt(24) > 1.
  norm = float(jnp.sqrt(sum(jnp.sum(m ** 2) for m in mu)))
  np.testing.assert_allclose(norm, 0.1 * 1.0, rtol=1e-5)
  # Without clipping the norm is the raw one.
  tx, _ = optim.make_optimizer(_cfg(lr_mults=cfg["lr_mults"]), params, total_steps=10)
  _, _, state = _step(tx, params, g)
  (adam,) = _find(state, optax.ScaleByAdamState)
  norm = float(jnp.sqrt(sum(jnp.sum(m ** 2) for m in jax.tree.leaves(adam.mu))))
  np.testing.assert_allclose(norm, 0.1 * 3.0 * np.sqrt(24), rtol=1e-5)


# --- adafactor --------------------------------------------------------------
def test_adafactor_factored_state_momentum_and_descent():
  params = {"enc": {"Dense_0": {"kernel": jnp.zeros((64, 64)), "bias": jnp.zeros((64,))},
                    "Small": {"kernel": jnp.zeros((16, 64))}}}
  target = jax.tree.map(lambda x: jnp.ones_like(x) * 0.5, params)
  cfg = _cfg(name="adafactor", lr=0.05, wd=0.0, clip_norm=1.0,
             schedule={"name": "constant", "warmup_steps": 0})
  tx, _ = optim.make_optimizer(cfg, params, total_steps=100)
  state = tx.init(params)
  (fs,) = _find(state, optax.FactoredState)
  assert fs.v_row["enc"]["Dense_0"]["kernel"].shape == (64,)
  assert fs.v_col["enc"]["Dense_0"]["kernel"].shape == (64,)
  assert fs.v["enc"]["Dense_0"]["kernel"].size == 1  # no full 64x64 second moment
  assert fs.v["enc"]["Small"]["kernel"].shape == (16, 64)  # 16 < factored_min_dim=32
  assert fs.v["enc"]["Dense_0"]["bias"].shape == (64,)
  (ema,) = _find(state, optax.EmaState)
  assert all(m.dtype == jnp.bfloat16 for m in jax.tree.leaves(ema.ema))

  def loss(p):
    return sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target)))

  step = jax.jit(lambda p, s: _step(tx, p, jax.grad(loss)(p), s)[::2])
  p, losses = params, [float(loss(params))]
  for _ in range(30):
    p, state = step(p, state)
    losses.append(float(loss(p)))
  assert losses[-1] < 0.2 * losses[0], losses[::5]
  (ema,) = _find(state, optax.EmaState)
  assert all(m.dtype == jnp.bfloat16 for m in jax.tree.leaves(ema.ema))


def test_adafactor_first_step_semantics():
  # Step 0: second-moment decay min(0.999, 1 - 1**-0.8) = 0, so u = g/|g|; the
  # momentum is an un-debiased EMA: mu = 0.1 * u; update = -lr * mu.
  params = {"b": jnp.array([1.0, -2.0, 3.0])}
  g = {"b": jnp.array([0.5, -4.0, 2.0])}
  cfg = _cfg(name="adafactor", lr=0.1, schedule={"name": "constant"})
  tx, _ = optim.make_optimizer(cfg, params, total_steps=10)
  _, u, _ = _step(tx, params, g)
  np.testing.assert_allclose(u["b"], -0.1 * 0.1 * np.sign(g["b"]), rtol=1e-2)


# --- misc -------------------------------------------------------------------
def test_unknown_optimizer_lists_valid():
  with pytest.raises(ValueError, match="adafactor.*adamw"):
    optim.make_optimizer(_cfg(name="adamx"), _params(), 10)


def test_configdict_and_abstract_params():
  cfg = ml_collections.ConfigDict(_cfg(
      wd=0.1, clip_norm=1.0, lr_mults=((r"img/.*", 0.0), (r".*", 1.0)),
      schedule={"name": "cosine", "warmup_steps": 2},
      adafactor={"decay_rate": 0.8, "beta2_cap": 0.999, "momentum": 0.9,
                 "factored_min_dim": 32, "eps": 1e-30}))
  cfg.name = "adafactor"
  abstract = jax.eval_shape(_params)
  tx, sched = optim.make_optimizer(cfg, abstract, total_steps=20)
  state_shape = jax.eval_shape(tx.init, abstract)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state_shape))
  assert optim.param_paths(abstract) == [
      "img/Dense_0/bias", "img/Dense_0/kernel", "t", "txt/Dense_0/bias", "txt/Dense_0/kernel"]
  assert float(sched(2)) == pytest.approx(0.1)
  # A jitted step on real params works.
  params = _params()
  step = jax.jit(lambda p, s, g: _step(tx, p, g, s)[::2])
  p, _ = step(params, tx.init(params), _grads(params))
  jax.tree.map(np.testing.assert_array_equal, p["img"], params["img"])


def test_param_names_are_spelled_one_way():
  """lr_mults / wd_mask regexes, init.include, exports and checkpoint messages name a param by
  its '/'-joined dict keys (big_mm.tree_paths); an optimizer state's path also spells sequence
  indices and attribute names, and its dict keys alone are its param's name."""
  from big_mm import tree_paths
  from big_mm.export import common
  params = _params()
  names = ["img/Dense_0/bias", "img/Dense_0/kernel", "t", "txt/Dense_0/bias",
           "txt/Dense_0/kernel"]
  assert optim.param_paths(params) == list(tree_paths.flat_dict(params)) == names
  assert list(common.flatten(params)) == names
  opt_paths = jax.tree_util.tree_leaves_with_path(optax.adam(0.1).init(params))
  assert [tree_paths.path_str(p) for p, _ in opt_paths][:3] == [
      "0/count", "0/mu/img/Dense_0/bias", "0/mu/img/Dense_0/kernel"]
  assert tree_paths.dict_keys(opt_paths[2][0]) == ("img", "Dense_0", "kernel")
