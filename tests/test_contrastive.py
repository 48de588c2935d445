"""Sharded contrastive losses equal the single-device full-batch reference (values and grads);
GradCache (objective.micro_batches) equals the whole-batch gradient; Matryoshka (MRL) losses
equal a plain jnp reference."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from big_mm import config as config_lib, sharding, train
from big_mm import objectives
from big_mm.models.towers import Towers
from big_mm.objectives import Contrastive, contrastive, losses
from conftest import tiny_config

MESHES = {
    "data8": ((8,), ("data",)),
    "data4_fsdp2": ((4, 2), ("data", "fsdp")),
    "data2_fsdp2_tensor2": ((2, 2, 2), ("data", "fsdp", "tensor")),
}
TB = {"sigmoid": (10.0, -10.0), "softmax": (14.0, 0.5)}


def _mesh(name):
  shape, names = MESHES[name]
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def _emb(seed, n, d):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  zi = jax.random.normal(k1, (n, d), jnp.float32)
  zt = jax.random.normal(k2, (n, d), jnp.float32)
  # Correlate the pairs a little so the diagonal matters.
  zt = zt + 0.5 * zi
  norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  return norm(zi), norm(zt)


# ------------------------------------------------------------------------- reference vs numpy


def _np_sigmoid(zi, zt, t, b):
  logits = t * zi.astype(np.float64) @ zt.astype(np.float64).T + b
  z = 2 * np.eye(len(zi)) - 1
  return float(np.mean(np.sum(np.log1p(np.exp(-z * logits)), axis=1)))


def _np_softmax(zi, zt, t, b):
  logits = t * zi.astype(np.float64) @ zt.astype(np.float64).T + b
  def ce(l):
    m = l.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(l - m).sum(axis=1, keepdims=True)))[:, 0]
    return np.mean(lse - np.diag(l))
  return float(0.5 * (ce(logits) + ce(logits.T)))


def test_references_match_numpy():
  zi, zt = _emb(0, 12, 8)
  zi_np, zt_np = np.asarray(zi), np.asarray(zt)
  got = losses.sigmoid_loss(zi, zt, 10.0, -10.0)
  np.testing.assert_allclose(got, _np_sigmoid(zi_np, zt_np, 10.0, -10.0), rtol=1e-5)
  got = losses.softmax_loss(zi, zt, 14.0)
  np.testing.assert_allclose(got, _np_softmax(zi_np, zt_np, 14.0, 0.0), rtol=1e-5)
  # A bias does not change softmax.
  np.testing.assert_allclose(losses.softmax_loss(zi, zt, 14.0, 3.0), got, rtol=1e-5)
  # bf16 inputs are computed in float32.
  assert losses.sigmoid_loss(zi.astype(jnp.bfloat16), zt, 10.0, -10.0).dtype == jnp.float32
  # The loss is not symmetric in a trivial way: permuting texts changes it.
  perm = np.roll(np.arange(12), 1)
  assert abs(float(losses.sigmoid_loss(zi, zt[perm], 10.0, -10.0)) - float(
      losses.sigmoid_loss(zi, zt, 10.0, -10.0))) > 1e-3


def test_invalid_arguments():
  zi, zt = _emb(0, 8, 4)
  with pytest.raises(ValueError, match="ring"):
    losses.contrastive_loss(zi, zt, 1.0, 0.0, loss="sigmoid", strategy="bogus")
  with pytest.raises(ValueError, match="softmax"):
    losses.contrastive_loss(zi, zt, 1.0, 0.0, loss="hinge", strategy="local")


def test_batch_axes_of():
  mesh = _mesh("data8")
  assert losses.batch_axes_of(mesh, ("data", "fsdp")) == ("data",)
  mesh = _mesh("data2_fsdp2_tensor2")
  assert losses.batch_axes_of(mesh, ("data", "fsdp")) == ("data", "fsdp")
  assert losses.batch_axes_of(mesh, "fsdp") == ("fsdp",)


# ------------------------------------------------------------------------- sharded == reference


def _sharded_value_and_grad(loss, strategy, mesh, zi, zt, t, b):
  axes = losses.batch_axes_of(mesh, ("data", "fsdp"))
  sh = NamedSharding(mesh, P(axes))
  rep = NamedSharding(mesh, P())
  args = (jax.device_put(zi, sh), jax.device_put(zt, sh),
          jax.device_put(jnp.float32(t), rep), jax.device_put(jnp.float32(b), rep))
  fn = functools.partial(losses.contrastive_loss, loss=loss, strategy=strategy, mesh=mesh,
                         batch_axes=("data", "fsdp"))
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(*args)


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("strategy", ["local", "all_gather", "ring"])
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_sharded_equals_reference(loss, strategy, mesh_name):
  mesh = _mesh(mesh_name)
  n = 32 if mesh_name == "data8" else 16
  zi, zt = _emb(1, n, 8)
  t, b = TB[loss]
  ref = losses.sigmoid_loss if loss == "sigmoid" else losses.softmax_loss
  want_v, want_g = jax.value_and_grad(ref, argnums=(0, 1, 2, 3))(zi, zt, jnp.float32(t),
                                                                 jnp.float32(b))
  got_v, got_g = _sharded_value_and_grad(loss, strategy, mesh, zi, zt, t, b)
  np.testing.assert_allclose(got_v, want_v, rtol=1e-5, atol=1e-6)
  for name, g, w in zip(("zimg", "ztxt", "t", "b"), got_g, want_g):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6,
                               err_msg=f"grad {name}")
  # Gradients are non-trivial (so the comparison could fail).
  assert float(jnp.abs(want_g[0]).max()) > 1e-3
  assert abs(float(want_g[2])) > 1e-4
  if loss == "sigmoid":
    assert abs(float(want_g[3])) > 1e-4


# ------------------------------------------------------------------------- memory


def _temp_bytes(loss, strategy, mesh, n, d):
  zi, zt = _emb(2, n, d)
  sh = NamedSharding(mesh, P(("data",)))
  rep = NamedSharding(mesh, P())
  fn = functools.partial(losses.contrastive_loss, loss=loss, strategy=strategy, mesh=mesh)
  g = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))
  args = (jax.device_put(zi, sh), jax.device_put(zt, sh),
          jax.device_put(jnp.float32(10.0), rep), jax.device_put(jnp.float32(-10.0), rep))
  ma = g.lower(*args).compile().memory_analysis()
  if ma is None:
    print(f"memory_analysis() returned None for {strategy} on {jax.default_backend()}")
    return None
  return ma.temp_size_in_bytes


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_ring_memory_smaller_than_all_gather(loss):
  mesh = _mesh("data8")
  n, d = 1024, 32
  ring = _temp_bytes(loss, "ring", mesh, n, d)
  ag = _temp_bytes(loss, "all_gather", mesh, n, d)
  if ring is None or ag is None:
    pytest.skip("compiled.memory_analysis() returned None on this backend")
  print(f"{loss} temp bytes: ring={ring} all_gather={ag}")
  # b x B logits (128 x 1024 f32 = 512 KiB) must not appear in the ring version.
  assert ring < ag, (ring, ag)


# ------------------------------------------------------------------------- GradCache


@pytest.fixture(scope="module")
def tiny_two_towers(data_dir):
  """(setup, params, batch): a tiny two-tower model on the 8-device mesh, batch 32."""
  setup = train.build(tiny_config(data_dir, batch_size=32))
  k1, k2 = jax.random.split(jax.random.PRNGKey(3))
  batch = {"image": jax.random.normal(k1, (32, 32, 32, 3), jnp.float32),
           "text": jax.random.randint(k2, (32, 8), 1, 128, jnp.int32)}
  batch = jax.device_put(batch, sharding.batch_sharding(setup.mesh))
  # Host params: jit places them (replicated, as the trainer does on a data-only mesh).
  init = jax.jit(lambda rng: setup.model.init(rng, {"image": batch["image"][:1],
                                                     "text": batch["text"][:1]}))
  params = jax.device_get(sharding.unbox(init(jax.random.key(0))["params"]))
  return setup, params, batch


def _objective(setup, **objective):
  """The run's objective (same context) with some settings changed."""
  settings = {k: v for k, v in setup.config.objective.items() if k != "name"}
  return Contrastive(setup.model, setup.objective.ctx, **{**settings, **objective})


def _value_and_grad(setup, fn, params, batch):
  with train.use_mesh(setup):
    return jax.jit(fn)(params, batch, jax.random.key(5))


def _assert_same(got, want, rtol=1e-5):
  (got_loss, got_metrics), got_grads = got
  (want_loss, want_metrics), want_grads = want
  np.testing.assert_allclose(got_loss, want_loss, rtol=rtol)
  for k in want_metrics:
    np.testing.assert_allclose(got_metrics[k], want_metrics[k], rtol=rtol, err_msg=k)
  flat_want = jax.tree_util.tree_leaves_with_path(want_grads)
  largest = max(float(np.abs(w).max()) for _, w in flat_want)
  assert jax.tree.structure(got_grads) == jax.tree.structure(want_grads)
  for (path, w), g in zip(flat_want, jax.tree.leaves(got_grads)):
    w, g = np.asarray(w), np.asarray(g)
    # Relative to the leaf's scale (float32 sums run in another order); leaves whose true
    # gradient is exactly 0 (attention key biases) hold only rounding noise, so their scale
    # is floored at 1% of the largest gradient.
    scale = max(float(np.abs(w).max()), 0.01 * largest)
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale,
                               err_msg=jax.tree_util.keystr(path))


# The GradCache code path does not depend on the loss (it only sees embedding gradients), so
# two compiles cover 2 and 4 micro-batches and both losses.
@pytest.mark.parametrize("loss,micro_batches", [("sigmoid", 2), ("softmax", 4)])
def test_gradcache_equals_full_batch_gradient(tiny_two_towers, loss, micro_batches):
  setup, params, batch = tiny_two_towers
  plain = _objective(setup, loss=loss)
  want = _value_and_grad(setup, jax.value_and_grad(plain.loss_fn, has_aux=True), params, batch)
  assert float(jnp.abs(want[1]["txt"]["Embed_0"]["embedding"]).max()) > 1e-4
  assert float(jnp.abs(want[1]["img"]["embedding"]["kernel"]).max()) > 1e-4
  assert abs(float(want[1]["t"][0])) > 1e-5
  gradcache = _objective(setup, loss=loss, micro_batches=micro_batches)
  got = _value_and_grad(setup, gradcache.value_and_grad, params, batch)
  _assert_same(got, want)


def test_gradcache_with_dropout_and_frozen_image_tower(data_dir, tiny_two_towers):
  """LiT with dropout: micro-batch i uses the same dropout rng in the forward and the
  backward pass (so GradCache is the exact gradient of loss_fn, whose embeddings are computed
  micro-batch by micro-batch), and the frozen tower gets exactly zero gradient."""
  _, params, batch = tiny_two_towers
  config = tiny_config(data_dir, batch_size=32, **{
      "model.towers.image.dropout": 0.2, "model.towers.text.dropout": 0.2,
      "optim.lr_mults": ((r"img/.*", 0.0), (r".*", 1.0)), "objective.micro_batches": 2})
  setup = train.build(config)
  objective = setup.objective
  with train.use_mesh(setup):
    plain = jax.jit(jax.value_and_grad(objective.loss_fn, has_aux=True))
    want = plain(params, batch, jax.random.key(5))
    (other_rng_loss, _), _ = plain(params, batch, jax.random.key(6))
  got = _value_and_grad(setup, objective.value_and_grad, params, batch)
  _assert_same(got, want)
  jax.tree.map(lambda g: np.testing.assert_array_equal(g, 0.0), got[1]["img"])
  assert float(jnp.abs(got[1]["txt"]["Embed_0"]["embedding"]).max()) > 1e-4
  assert abs(float(other_rng_loss) - float(want[0][0])) > 1e-4  # dropout is really on


def test_micro_batches_errors(data_dir):
  for bad in (0, -2, 1.5, True):
    with pytest.raises(config_lib.ConfigError, match="objective.micro_batches must be a positive"):
      tiny_config(data_dir, **{"objective.micro_batches": bad})
  # 16 rows over 8 devices in 4 micro-batches would leave a device half a row per micro-batch.
  with pytest.raises(config_lib.ConfigError,
                     match=r"micro_batches x batch devices = 4 x 8 .* = 32"):
    train.build(tiny_config(data_dir, **{"objective.micro_batches": 4}))



def test_other_objectives_settings_are_unknown_keys(data_dir, tiny_two_towers):
  """Settings of the other objectives are unknown keys here (refused before any compute,
  naming the objective that has them), not silently ignored."""
  setup, _, _ = tiny_two_towers
  for key, value, owners in (("label_smoothing", 0.1, r"\['captioning', 'coca', 'ul2', 'cm3'\]"),
                             ("caption_weight", 1.0, r"\['coca'\]"),
                             ("num_visible", 10, r"\['multimae'\]")):
    match = (rf"Unknown config key 'objective.{key}' for objective.name='contrastive': it is a "
             rf"setting of objective.name in {owners} only")
    with pytest.raises(config_lib.ConfigError, match=match):
      tiny_config(data_dir, **{f"objective.{key}": value})
    with pytest.raises(config_lib.ConfigError, match=match):
      _objective(setup, **{key: value})
  with pytest.raises(config_lib.ConfigError, match=r"'objective.los'.*Did you mean 'loss'"):
    _objective(setup, los="softmax")


def test_contrasted_modalities_are_named_towers(tiny_two_towers):
  """objective.modalities picks the towers by name: swapping them transposes the logits (the
  sigmoid loss sums over all pairs, so it is unchanged); a modality without a tower fails."""
  setup, params, batch = tiny_two_towers
  rng = jax.random.key(5)
  with train.use_mesh(setup):
    want, want_metrics = jax.jit(_objective(setup, loss="sigmoid").loss_fn)(params, batch, rng)
    swapped = _objective(setup, loss="sigmoid", modalities=("text", "image"))
    got, got_metrics = jax.jit(swapped.loss_fn)(params, batch, rng)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got_metrics["txt_img_cos/pos"], want_metrics["img_txt_cos/pos"],
                             rtol=1e-5)
  with pytest.raises(config_lib.ConfigError, match="two different modalities"):
    _objective(setup, modalities=("image", "image"))
  with pytest.raises(config_lib.ConfigError, match=r"objective.modalities entry='smell'"):
    _objective(setup, modalities=("image", "smell"))
  with pytest.raises(config_lib.ConfigError, match=r"no tower for \['depth'\].*\['image', 'text'\]"):
    _objective(setup, modalities=("image", "depth"))


# ------------------------------------------------------------------------- Matryoshka (MRL)

MRL_DIMS, MRL_WEIGHTS = (2, 4, 8), (0.5, 1.0, 2.0)


def _normalise(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _mrl_reference(loss, zi, zt, t, b):
  """sum_k w_k * loss(normalise(zi[:, :d_k]), normalise(zt[:, :d_k])), written out in jnp. The
  full dim is taken as it is: the model's embeddings are unit vectors already (normalising
  them again would change the gradient w.r.t. z by its radial part, which the model's own
  normalisation removes anyway)."""
  ref = losses.sigmoid_loss if loss == "sigmoid" else losses.softmax_loss
  prefix = lambda x, d: x if d == x.shape[1] else _normalise(x[:, :d])
  return sum(w * ref(prefix(zi, d), prefix(zt, d), t, b) for d, w in zip(MRL_DIMS, MRL_WEIGHTS))


@pytest.mark.parametrize("implementation", ["xla", "pallas", "chunked"])
@pytest.mark.parametrize("strategy", ["one_device", "local", "all_gather", "ring"])
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_matryoshka_loss_equals_reference(loss, strategy, implementation):
  """Every prefix's loss is re-normalised and weighted, for both losses, every strategy on the
  8-device mesh (and one device), the xla code and the fused kernel (interpret mode)."""
  mesh = None if strategy == "one_device" else _mesh("data8")
  zi, zt = _emb(6, 32, 8)
  t, b = jnp.float32(TB[loss][0]), jnp.float32(TB[loss][1])
  want_v, want_g = jax.value_and_grad(functools.partial(_mrl_reference, loss), (0, 1, 2, 3))(
      zi, zt, t, b)

  def mrl(zi, zt, t, b):
    pair_loss = lambda za, zb: losses.contrastive_loss(
        za, zb, t, b, loss=loss, strategy="local" if mesh is None else strategy, mesh=mesh,
        implementation=implementation)
    return contrastive.matryoshka_loss(pair_loss, zi, zt, MRL_DIMS, MRL_WEIGHTS)

  args = (zi, zt, t, b)
  if mesh is not None:
    sh, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    args = tuple(jax.device_put(x, sh if i < 2 else rep) for i, x in enumerate(args))
  (got_v, prefix_losses), got_g = jax.jit(jax.value_and_grad(mrl, (0, 1, 2, 3), has_aux=True))(
      *args)
  np.testing.assert_allclose(got_v, want_v, rtol=1e-5, atol=1e-6)
  for name, g, w in zip(("zimg", "ztxt", "t", "b"), got_g, want_g):
    # Softmax does not depend on b: its gradient is 0 up to the rounding of sums of ~1.
    atol = 1e-5 if (loss, name) == ("softmax", "b") else 1e-6
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=atol,
                               err_msg=f"grad {name}")
  # Each prefix's own (unweighted) loss is reported.
  ref = losses.sigmoid_loss if loss == "sigmoid" else losses.softmax_loss
  assert sorted(prefix_losses) == ["loss@d2", "loss@d4", "loss@d8"]
  np.testing.assert_allclose(prefix_losses["loss@d4"],
                             ref(_normalise(zi[:, :4]), _normalise(zt[:, :4]), t, b), rtol=1e-5)
  # The prefixes' gradients are not those of the full-dim loss alone (so the test could fail).
  full_g = jax.grad(ref)(zi, zt, t, b)
  assert float(jnp.abs(want_g[0] - MRL_WEIGHTS[-1] * full_g).max()) > 1e-3


def test_matryoshka_full_dim_alone_is_the_plain_loss(tiny_two_towers):
  """matryoshka_dims=(D,) is today's loss exactly (values and gradients, bit for bit)."""
  setup, params, batch = tiny_two_towers
  value_and_grad = lambda objective: _value_and_grad(
      setup, jax.value_and_grad(objective.loss_fn, has_aux=True), params, batch)
  (want, _), want_grads = value_and_grad(_objective(setup))
  (got, metrics), got_grads = value_and_grad(_objective(setup, matryoshka_dims=(16,)))
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(metrics["loss@d16"], want)
  jax.tree.map(np.testing.assert_array_equal, got_grads, want_grads)


def test_matryoshka_gradcache_equals_full_batch(tiny_two_towers):
  """GradCache with MRL on: the prefix losses share one pass over the towers and its gradient
  equals the whole-batch one; the loss is the weighted sum of the logged prefix losses."""
  setup, params, batch = tiny_two_towers
  mrl = dict(loss="softmax", matryoshka_dims=(4, 8, 16), matryoshka_weights=(2.0, 1.0, 0.5))
  plain = _objective(setup, **mrl)
  want = _value_and_grad(setup, jax.value_and_grad(plain.loss_fn, has_aux=True), params, batch)
  (loss, metrics), _ = want
  np.testing.assert_allclose(
      loss, 2.0 * metrics["loss@d4"] + metrics["loss@d8"] + 0.5 * metrics["loss@d16"], rtol=1e-6)
  assert abs(float(metrics["loss@d4"]) - float(metrics["loss@d16"])) > 1e-3
  got = _value_and_grad(setup, _objective(setup, micro_batches=2, **mrl).value_and_grad, params,
                        batch)
  _assert_same(got, want)


def test_matryoshka_settings_errors(data_dir, tiny_two_towers):
  setup, _, _ = tiny_two_towers
  for dims, match in (((8, 4), "strictly increasing"), ((0, 4), "positive embedding dims"),
                      ("8", "positive embedding dims"), ((4.0, 8), "positive embedding dims")):
    with pytest.raises(config_lib.ConfigError, match=rf"objective.matryoshka_dims must be .*"
                                                     rf"{match}"):
      tiny_config(data_dir, **{"objective.matryoshka_dims": dims})
  for weights, match in (((1.0,), "has 1 entries but matryoshka_dims=\\(4, 8\\) has 2"),
                         ((1.0, 0.0), "entries must be > 0"),
                         ((1.0, "a"), "must be a number")):
    with pytest.raises(config_lib.ConfigError, match=rf"objective.matryoshka_weights.*{match}"):
      tiny_config(data_dir, **{"objective.matryoshka_dims": (4, 8),
                               "objective.matryoshka_weights": weights})
  # The embedding is 16-d (model.out_dim): checked against the model when the objective is built.
  with pytest.raises(config_lib.ConfigError,
                     match=r"matryoshka_dims=\(4, 32\) goes beyond the embedding.*'image': 16"):
    _objective(setup, matryoshka_dims=(4, 32))
  with pytest.raises(config_lib.ConfigError, match="implemented for the contrastive objective"):
    objectives.settings({"name": "captioning", "matryoshka_dims": (4, 8)})


@pytest.mark.parametrize("recipe,image_size,text_len,dims,embedding", [
    ("demo_mrl.py", (32, 32), 16, (8, 16, 32, 64), 64),
    ("demo_mrl.py:mrl=false,dim=8", (32, 32), 16, (), 8),
    ("mrl_siglip_b16.py", (224, 224), 64, (12, 24, 48, 96, 192, 384, 768), 768)])
def test_matryoshka_recipes_are_valid(recipe, image_size, text_len, dims, embedding):
  """The MRL recipes load and their dims fit their models' embeddings (shapes only)."""
  c = config_lib.load(f"configs/{recipe}")
  objective = Contrastive(Towers(**c.model.to_dict()),
                          objectives.Context(image_size=image_size, text_len=text_len),
                          **{k: v for k, v in c.objective.items() if k != "name"})
  assert objective.matryoshka_dims == dims
  assert objective.embedding_dims() == {"image": embedding, "text": embedding}



# ------------------------------------------------------------------------- presence mask (valid=)


def _presence(n):
  """A mask over the 8 shards of n // 8 rows: shard 1 all absent, shards 0 and 5 partly."""
  per = n // 8
  valid = np.ones(n, bool)
  valid[per:2 * per] = False
  valid[[0, 5 * per + 1]] = False
  return valid


NP_REFS = {"sigmoid": _np_sigmoid, "softmax": _np_softmax}


@functools.cache
def _ref_value_and_grad(loss):
  """jit(value_and_grad) of the single-device reference (zimg, ztxt, t, b, valid=None), one
  per loss for all the tests below (eager calls would compile every op)."""
  ref = losses.sigmoid_loss if loss == "sigmoid" else losses.softmax_loss
  return jax.jit(jax.value_and_grad(ref, (0, 1, 2, 3)))


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_masked_reference_is_the_present_sub_batch(loss):
  """Dropping the absent rows gives the same loss (sigmoid: the sum over present pairs /
  n_valid) and the same gradients; absent rows get zero gradient; all present = unmasked."""
  vg = _ref_value_and_grad(loss)
  t, b = (jnp.float32(x) for x in TB[loss])
  zi, zt = _emb(7, 12, 8)
  valid = np.array([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1], bool)
  keep = np.flatnonzero(valid)
  got, grads = vg(zi, zt, t, b, valid)
  np.testing.assert_allclose(got, NP_REFS[loss](np.asarray(zi)[keep], np.asarray(zt)[keep], t, b),
                             rtol=1e-5)
  sub, sub_grads = vg(zi[keep], zt[keep], t, b)
  np.testing.assert_allclose(got, sub, rtol=1e-6)
  for name, g, w in zip(("zimg", "ztxt"), grads[:2], sub_grads[:2]):
    np.testing.assert_allclose(g[keep], w, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(g[~valid], 0.0, err_msg=name)
  np.testing.assert_allclose(grads[2:], sub_grads[2:], rtol=1e-5, atol=1e-6)
  # A float mask is the same mask; all present is the unmasked loss; the mask matters.
  np.testing.assert_allclose(vg(zi, zt, t, b, valid.astype(np.float32))[0], got, rtol=1e-6)
  unmasked = vg(zi, zt, t, b)[0]
  np.testing.assert_allclose(vg(zi, zt, t, b, np.ones(12, np.float32))[0], unmasked, rtol=1e-6)
  assert abs(float(got) - float(unmasked)) > 1e-2
  # Nothing present: loss 0, gradients zero (not NaN).
  value, grads = vg(zi, zt, t, b, np.zeros(12, bool))
  assert float(value) == 0.0
  for g in grads:
    np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("mesh_name", ["data8", "data4_fsdp2"])
@pytest.mark.parametrize("strategy", ["local", "all_gather", "ring"])
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_masked_sharded_equals_reference(loss, strategy, mesh_name):
  """Every strategy with some rows absent (one shard wholly) equals the masked reference in
  value and gradients; nothing present gives 0 and zero gradients (the same compile)."""
  mesh = _mesh(mesh_name)
  n = 32 if mesh_name == "data8" else 16
  zi, zt = _emb(8, n, 8)
  t, b = (jnp.float32(x) for x in TB[loss])
  sh = NamedSharding(mesh, P(losses.batch_axes_of(mesh)))
  fn = jax.jit(jax.value_and_grad(functools.partial(
      losses.contrastive_loss, loss=loss, strategy=strategy, mesh=mesh), argnums=(0, 1, 2, 3)))
  for valid in (_presence(n), np.zeros(n, bool)):
    want_v, want_g = _ref_value_and_grad(loss)(zi, zt, t, b, valid)
    got_v, got_g = fn(jax.device_put(zi, sh), jax.device_put(zt, sh), t, b,
                      valid=jax.device_put(valid, sh))
    np.testing.assert_allclose(got_v, want_v, rtol=1e-5, atol=1e-6)
    for name, g, w in zip(("zimg", "ztxt", "t", "b"), got_g, want_g):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6,
                                 err_msg=f"grad {name}")
    if valid.any():  # non-trivial gradients (so the comparison could fail)
      assert float(jnp.abs(want_g[0]).max()) > 1e-3 and abs(float(want_g[2])) > 1e-4
  assert float(got_v) == 0.0
  for g in got_g:
    np.testing.assert_array_equal(g, 0.0)


def test_mask_errors():
  zi, zt = _emb(0, 8, 4)
  kw = dict(loss="sigmoid", valid=np.ones(8, bool))
  with pytest.raises(ValueError, match="kernels take no presence mask; use implementation='xla'"):
    losses.contrastive_loss(zi, zt, 10.0, -10.0, strategy="local", implementation="pallas", **kw)
  with pytest.raises(ValueError, match="kernels take no presence mask"):
    losses.contrastive_loss(zi, zt, 10.0, -10.0, strategy="ring", mesh=_mesh("data8"),
                            implementation="pallas", **kw)
  with pytest.raises(ValueError, match="the multi-positive loss takes no presence mask"):
    losses.contrastive_loss(zi, jnp.stack([zt, zt], 1), 10.0, -10.0, strategy="local", **kw)
  with pytest.raises(ValueError, match=r"presence mask of shape \(8,\).*got shape \(7,\)"):
    losses.contrastive_loss(zi, zt, 10.0, -10.0, loss="softmax", strategy="local",
                            valid=np.ones(7, bool))
