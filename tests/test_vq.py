"""Discrete tokenizers: model big_mm/models/vq.py, objective big_mm/objectives/vq.py."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_mm import config as config_lib
from big_mm import objectives, sharding
from big_mm.evaluators import cross_modal
from big_mm.models import vq as vq_lib
from big_mm.objectives import vq as vq_obj

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"rgb": "image", "depth": "depth", "semseg": "semseg"}


def _objective(modality="rgb", quantizer="vq", **kw):
  model_kw = dict(modality=modality, image_size=8, downsample=2, channels=8, num_res_blocks=1,
                  quantizer=quantizer, codebook_size=16, code_dim=4, levels=(3, 4, 2),
                  num_classes=3, depth_mean=5.0, depth_std=2.0)
  settings = dict(kw.pop("objective", {}))
  model_kw.update(kw)
  model = vq_lib.VQTokenizer(**model_kw)
  return vq_obj.VQTokenizer(model, objectives.Context(), **settings)


def _batch(modality, b=4, seed=0, size=8):
  rng = np.random.default_rng(seed)
  if modality == "rgb":
    x = jnp.asarray(rng.uniform(-1, 1, (b, size, size, 3)), jnp.float32)
  elif modality == "depth":
    x = jnp.asarray(rng.uniform(2, 9, (b, size, size)), jnp.float32)
  else:
    x = jnp.asarray(rng.integers(0, 3, (b, size, size)), jnp.int32)
  return {KEYS[modality]: x}


def _params(obj, seed=0):
  return sharding.unbox(obj.init_params(jax.random.key(seed)))


def test_fsq_index_round_trip_covers_every_code():
  levels = (8, 5, 5, 5)
  codes = jnp.arange(1000)
  values = vq_lib.fsq_values(codes, levels)
  assert float(jnp.max(jnp.abs(values))) <= 1.0
  np.testing.assert_array_equal(vq_lib.fsq_index(values, levels), codes)
  # Quantising any latent gives a value on the grid whose index maps back to it.
  z = jax.random.normal(jax.random.key(0), (4096, 4)) * 3
  q, idx = vq_lib.fsq_quantize(z, levels)
  assert int(idx.min()) >= 0 and int(idx.max()) < 1000
  assert len(np.unique(np.asarray(idx))) > 500
  np.testing.assert_allclose(vq_lib.fsq_values(idx, levels), q, atol=1e-6)
  # Even levels use all L values: dim 0 (L = 8) takes 8 distinct values.
  assert len(np.unique(np.asarray(q[:, 0]))) == 8


def test_fsq_straight_through_gradient():
  z = jnp.linspace(-0.5, 0.5, 6).reshape(2, 3)
  grad = jax.grad(lambda z: jnp.sum(vq_lib.fsq_quantize(z, (5, 5, 5))[0]))(z)
  # d/dz of tanh(z) * half_l / half_width at the rounding's straight-through: nonzero, smooth.
  expected = (1 - jnp.tanh(z) ** 2) * (4 * (1 - 1e-3) / 2) / 2
  np.testing.assert_allclose(grad, expected, rtol=1e-5)


def test_vq_straight_through_gradient_reaches_the_encoder():
  obj = _objective("rgb", "vq")
  params = _params(obj)
  x = _batch("rgb")["image"]

  def recon_sum(p):
    return jnp.sum(obj.model.apply({"params": p}, x)["recon"])

  grads = jax.jit(jax.grad(recon_sum))(params)
  enc = jax.tree.leaves(grads["encoder"])
  assert all(np.isfinite(g).all() for g in enc)
  assert sum(float(jnp.sum(jnp.abs(g))) for g in enc) > 0
  # The decoder's output does not move the codebook (only the codebook loss does).
  assert float(jnp.max(jnp.abs(grads["codebook"]))) == 0.0
  # Forward: the decoder sees exactly the looked-up codes.
  out = jax.jit(lambda p: obj.model.apply({"params": p}, x))(params)
  book = np.asarray(vq_lib._l2norm(params["codebook"]))  # pylint: disable=protected-access
  np.testing.assert_allclose(out["zq"].reshape(-1, 4), book[np.asarray(out["codes"]).reshape(-1)],
                             atol=1e-6)
  # The lookup is the nearest code by cosine similarity.
  z = np.asarray(out["z"]).reshape(-1, 4)
  np.testing.assert_array_equal(np.argmax(z @ book.T, axis=1),
                                np.asarray(out["codes"]).reshape(-1))


def test_usage_state_and_dead_code_pull():
  obj = _objective("rgb", "vq", objective=dict(restart_after=3))
  params = _params(obj)
  batch = _batch("rgb")
  extra = obj.init_extra_state(params)
  _, m = obj.loss_fn(params, batch, jax.random.key(0), extra=extra, step=jnp.int32(0))
  used = np.asarray(m[objectives.base.EXTRA_STATS]["used"])
  codes = np.unique(np.asarray(obj.model.apply({"params": params}, batch["image"])["codes"]))
  np.testing.assert_array_equal(np.nonzero(used)[0], codes)
  assert float(m["codebook/dead_codes"]) == 0.0  # nothing is dead before restart_after steps
  extra = obj.update_extra_state(extra, params, jnp.int32(1), {"used": jnp.asarray(used)})
  np.testing.assert_array_equal(np.asarray(extra["last_used"]), np.where(used > 0, 1, 0))
  # After 3 steps, the codes never used are dead; those used in step 1 are not (unused for 2).
  dead = np.asarray(obj.dead(extra, jnp.int32(3)))
  np.testing.assert_array_equal(dead, used == 0)
  _, m = obj.loss_fn(params, batch, jax.random.key(0), extra=extra, step=jnp.int32(3))
  assert float(m["codebook/dead_codes"]) == (used == 0).sum() > 0
  # The restart term pulls dead codes only: its gradient is zero on live codes.
  def restart(p):
    return obj.loss_fn(p, batch, jax.random.key(0), extra=extra, step=jnp.int32(3))[1][
        "vq/restart"]
  g = np.asarray(jax.grad(restart)(params)["codebook"])
  assert np.abs(g[used > 0]).max() == 0.0
  assert (np.abs(g[used == 0]).sum(axis=1) > 0).all()


def _codes_near_the_data(restart_after):
  """After 30 adam steps on one batch (64 codes, 16 tokens per image): how many codes have
  cosine similarity > 0.95 to one of the batch's encoder outputs."""
  import optax  # pylint: disable=g-import-not-at-top
  obj = _objective("rgb", "vq", codebook_size=64, objective=dict(restart_after=restart_after))
  params = _params(obj)
  batch = _batch("rgb", b=2)
  tx = optax.adam(3e-2)
  opt = tx.init(params)
  extra = obj.init_extra_state(params)

  @jax.jit
  def step(params, opt, extra, i):
    (_, m), g = jax.value_and_grad(obj.loss_fn, has_aux=True)(
        params, batch, jax.random.key(i), extra=extra, step=i)
    upd, opt = tx.update(g, opt, params)
    params = optax.apply_updates(params, upd)
    return params, opt, obj.update_extra_state(extra, params, i + 1, m[
        objectives.base.EXTRA_STATS])

  for i in range(30):
    params, opt, extra = step(params, opt, extra, jnp.int32(i))
  z = obj.model.apply({"params": params}, batch["image"])["z"].reshape(-1, 4)
  book = vq_lib._l2norm(params["codebook"])  # pylint: disable=protected-access
  return int(jnp.sum(jnp.max(book @ z.T, axis=1) > 0.95))


def test_dead_codes_are_pulled_onto_the_data():
  """With 64 codes and 32 tokens most codes are never picked; the dead-code pull moves them
  onto encoder outputs, while without it (restart_after longer than the run) they stay put."""
  near, near_without = _codes_near_the_data(2), _codes_near_the_data(1000)
  assert near >= near_without + 10, (near, near_without)


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
@pytest.mark.parametrize("modality", ["rgb", "depth", "semseg"])
def test_encode_decode_shapes_and_determinism(modality, quantizer):
  obj = _objective(modality, quantizer)
  params = _params(obj)
  x = _batch(modality)[KEYS[modality]]
  model = obj.model
  codes = jax.jit(lambda x: model.apply({"params": params}, x, method=model.encode))(x)
  assert codes.shape == (4, 16) and codes.dtype == jnp.int32
  assert int(codes.min()) >= 0 and int(codes.max()) < model.vocab_size
  np.testing.assert_array_equal(codes, model.apply({"params": params}, x, method=model.encode))
  out = model.to_output(model.apply({"params": params}, codes, method=model.decode_codes))
  shape = {"rgb": (4, 8, 8, 3), "depth": (4, 8, 8), "semseg": (4, 8, 8, 3)}[modality]
  assert out.shape == shape and out.dtype == jnp.float32
  # decode(encode(x)) is the forward pass's reconstruction; predict gives it in output units.
  recon = model.apply({"params": params}, x)["recon"]
  np.testing.assert_allclose(model.apply({"params": params}, codes, method=model.decode_codes),
                             recon, rtol=1e-5, atol=1e-5)
  pred = obj.predict(params, {KEYS[modality]: x}, inputs=(modality,), targets=(modality,))
  np.testing.assert_allclose(pred[modality], out, rtol=1e-5, atol=1e-5)
  assert model.vocab_size == (16 if quantizer == "vq" else 24)


def test_metrics_of_a_perfect_reconstruction():
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)
  assert float(vq_obj.psnr(x, x)) == pytest.approx(100.0)
  # An error of 0.2 in [-1, 1] is 0.1 in [0, 1]: 20 dB.
  assert float(vq_obj.psnr(jnp.clip(x, -0.8, 0.8) * 0 + 0.2, jnp.zeros_like(x))) == (
      pytest.approx(20.0, rel=1e-5))
  s = vq_obj.code_stats(jnp.asarray([0, 0, 1, 1]), 8)
  assert float(s["codebook/perplexity"]) == pytest.approx(2.0)
  assert float(s["codebook/used_fraction"]) == pytest.approx(0.25)
  true = jnp.asarray([[0, 1, 1, 2]])
  assert float(vq_obj.miou(true, true, 4)) == 1.0
  assert float(vq_obj.miou(jnp.asarray([[0, 1, 2, 2]]), true, 4)) == pytest.approx(
      (1 + 0.5 + 0.5) / 3)


@pytest.mark.parametrize("modality,quantizer", [("rgb", "vq"), ("depth", "fsq"),
                                                ("semseg", "fsq")])
def test_loss_decreases_on_a_tiny_batch(modality, quantizer):
  import optax  # pylint: disable=g-import-not-at-top
  obj = _objective(modality, quantizer)
  params = _params(obj)
  batch = _batch(modality)
  tx = optax.adam(1e-2)
  opt = tx.init(params)
  extra = obj.init_extra_state(params)

  @jax.jit
  def step(params, opt, i):
    (loss, m), g = jax.value_and_grad(obj.loss_fn, has_aux=True)(
        params, batch, jax.random.key(0), extra=extra, step=i)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss, m

  losses = []
  for i in range(30):
    params, opt, loss, m = step(params, opt, jnp.int32(i))
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0], losses
  assert all(np.isfinite(float(v)) for k, v in m.items() if k != objectives.base.EXTRA_STATS)


def test_sharded_loss_and_grad_equal_single_device():
  obj = _objective("rgb", "vq")
  batch = _batch("rgb", b=8)
  params = _params(obj)
  extra = obj.init_extra_state(params)
  rng = jax.random.key(3)
  kw = dict(extra=extra, step=jnp.int32(5))
  grad_fn = jax.jit(jax.value_and_grad(lambda p, b, r: obj.loss_fn(p, b, r, **kw), has_aux=True))
  (ref_loss, _), ref_grads = grad_fn(params, batch, rng)
  mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(None, mesh)):
    boxed = jax.eval_shape(lambda: obj.init_params(jax.random.key(0)))
    param_sh = sharding.logical_shardings(boxed, mesh)
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(param_sh))
    sharded_params = jax.device_put(params, param_sh)
    sharded_batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    (loss, _), grads = grad_fn(sharded_params, sharded_batch, rng)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), grads,
               ref_grads)


def test_config_errors():
  with pytest.raises(ValueError, match="power of 2"):
    vq_lib.VQTokenizer(downsample=3)
  with pytest.raises(ValueError, match="quantizer"):
    vq_lib.VQTokenizer(quantizer="rvq")
  with pytest.raises(config_lib.ConfigError, match="beta"):
    objectives.settings(dict(name="vq_tokenizer", beta=-1.0))
  model = vq_lib.VQTokenizer(modality="depth", image_size=8, downsample=2)
  with pytest.raises(config_lib.ConfigError, match="input.modalities"):
    vq_obj.VQTokenizer(model, objectives.Context(modalities=("rgb",)))
  with pytest.raises(ValueError, match="only reconstructs"):
    _objective("rgb").predict({}, {}, inputs=("rgb",), targets=("depth",))
  # cross_modal: a round trip is valid config, refused for an objective that is no tokenizer.
  validate = cross_modal._validate_predictions  # pylint: disable=protected-access
  validate("p", (("rgb", ("rgb",)),))
  with pytest.raises(config_lib.ConfigError, match="not the target itself"):
    validate("p", (("rgb", ("rgb", "depth")),))


def _tiny_run_config(scenes_dir, modality="depth"):
  c = config_lib.load(os.path.join(ROOT, "configs", f"demo_4m_tokenizer.py:modality={modality}"
                                   ",steps=4,batch=16,channels=8"))
  with c.unlocked():
    c.input.data_dir = scenes_dir
    c.log_every_steps = 1
    c.optim.schedule.warmup_steps = 1
    c.evals.recon.update(split="test[:32]", baseline_examples=32, every_steps=4)
  return c


def test_load_round_trip_from_a_trained_run(scenes_dir, tmp_path):
  from big_mm import train  # pylint: disable=g-import-not-at-top
  config = _tiny_run_config(scenes_dir, "depth")
  results = train.train(config, str(tmp_path))
  assert np.isfinite(results["eval/recon/depth_from_depth/abs_rel"])
  assert results["eval/recon/depth_from_depth/num_examples"] == 32
  tok = vq_lib.load(str(tmp_path))
  assert (tok.modality, tok.grid, tok.num_tokens, tok.vocab_size, tok.step) == (
      "depth", (8, 8), 64, 1000, 4)
  x = jnp.asarray(np.random.default_rng(0).uniform(2, 14, (3, 32, 32)), jnp.float32)
  codes = jax.jit(tok.encode)(x)
  assert codes.shape == (3, 64) and codes.dtype == jnp.int32
  depth = jax.jit(tok.decode)(codes)
  assert depth.shape == (3, 32, 32)
  # The same as the objective's predict with the run's params (metres).
  from big_mm import cli  # pylint: disable=g-import-not-at-top
  params, _ = cli.restore_params(str(tmp_path), 4)
  obj = train.build(config).objective
  np.testing.assert_allclose(depth, obj.predict(params, {"depth": x}, inputs=("depth",),
                                                targets=("depth",))["depth"], rtol=1e-4,
                             atol=1e-4)


def test_load_refuses_other_runs(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="no config.json"):
    vq_lib.load(str(tmp_path))
  (tmp_path / "config.json").write_text('{"model_name": "multimae"}')
  with pytest.raises(config_lib.ConfigError, match="not a vq_tokenizer run"):
    vq_lib.load(str(tmp_path))
