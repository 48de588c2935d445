"""Generative models and objectives: decoder masks, KV-cache decoding, losses, sharding."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from big_mm import config as config_lib, sharding
from big_mm.models import get_model
from big_mm.models.decoder import Decoder
from big_mm.objectives import generative, get_objective

from conftest import TOKENIZER

IMG = dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=(8, 8))
DEC = dict(width=32, depth=2, mlp_dim=64, num_heads=2, vocab_size=128, max_len=8)
TEXTS = np.array([[5, 6, 7, 1, 0, 0, 0, 0], [9, 1, 0, 0, 0, 0, 0, 0],
                  [3, 4, 5, 6, 7, 8, 9, 1], [12, 13, 1, 0, 0, 0, 0, 0]], np.int32)
MODELS = {
    "cappa": ("captioning", "captioner", dict(image=IMG, decoder=DEC)),
    "prefix_lm": ("captioning", "captioner", dict(image=IMG, decoder=DEC, prefix_lm=True)),
    "coca": ("coca", "coca", dict(image=IMG, text=DEC, multimodal=dict(depth=1), out_dim=16,
                                  temperature_init=10.0, bias_init=-10.0)),
}


def _config(kind, depth=None, **objective):
  name, model_name, model = MODELS[kind]
  if depth is not None:
    model = dict(model, decoder=dict(DEC, depth=depth))
  c = config_lib.defaults()
  c.total_steps = 1
  c.batch_size = 8
  c.model_name = model_name
  c.model = model
  c.input.tokenizer = TOKENIZER
  c.input.text_len = 8
  c.objective.name = name
  c.objective.update(objective)
  config_lib.validate(c)
  return c


def _setup(kind, mesh=None, depth=None, **objective):
  c = _config(kind, depth, **objective)
  model = get_model(c.model_name, **c.model.to_dict())
  obj = get_objective(c.objective.name)(c, model, mesh)
  images = jax.random.normal(jax.random.key(1), (len(TEXTS), 32, 32, 3))
  params = sharding.unbox(model.init({"params": jax.random.key(0)}, images[:1], TEXTS[:1],
                                     train=False)["params"])
  return obj, params, images, jnp.asarray(TEXTS)


@pytest.fixture(scope="module")
def setups():
  return {k: _setup(k) for k in MODELS}


@pytest.mark.parametrize("kind", list(MODELS))
def test_causal(setups, kind):
  """Teacher-forced logits at position i do not depend on the tokens after i."""
  obj, params, images, texts = setups[kind]
  changed = texts.at[:, 4:].set(77)
  logits = jax.jit(obj._logits)
  a, b = logits(params, images, texts), logits(params, images, changed)
  # Target 4 is input 5: positions <= 4 see only inputs <= 4 (= text[:4]).
  np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-5)
  assert np.max(np.abs(a[:, 5:] - b[:, 5:])) > 1e-3


@pytest.mark.parametrize("kind", list(MODELS))
def test_decode_step_equals_full(setups, kind):
  """Feeding the teacher-forced inputs one at a time through the KV cache gives the logits
  (and log-likelihoods) of the full pass."""
  obj, params, images, texts = setups[kind]
  full = jax.jit(obj._logits)(params, images, texts)
  enc = obj.encode(params, images)
  cache = obj.init_cache(params, enc, texts.shape[1])
  for leaf in jax.tree.leaves((enc, cache)):
    assert leaf.shape[0] == len(texts)
  inputs = jnp.pad(texts, ((0, 0), (1, 0)))[:, :-1]
  step = jax.jit(obj.decode_step)
  for pos in range(texts.shape[1]):
    logits, cache = step(params, enc, cache, inputs[:, pos], jnp.int32(pos))
    np.testing.assert_allclose(logits, full[:, pos], atol=2e-5, rtol=1e-5)
  logp, n = obj.log_likelihood(params, images, texts)
  ref = jnp.take_along_axis(jax.nn.log_softmax(full), texts[..., None], -1)[..., 0]
  np.testing.assert_allclose(logp, jnp.sum(jnp.where(texts != 0, ref, 0), 1), rtol=1e-5)
  np.testing.assert_array_equal(n, [4, 2, 8, 3])


def test_parallel_prediction(setups):
  """Parallel rows read only [MASK] inputs (their logits ignore the tokens) and attend
  bidirectionally; autoregressive rows stay causal."""
  obj, params, images, texts = setups["cappa"]
  model = obj.model
  parallel = jnp.array([True, False, True, False])
  run = jax.jit(lambda t: model.apply({"params": params}, images, t, parallel=parallel)[0])
  a, b = run(texts), run(texts.at[:, 2:].set(77))
  np.testing.assert_allclose(a[parallel], b[parallel], atol=1e-6)
  assert np.max(np.abs(a[~parallel][:, 3:] - b[~parallel][:, 3:])) > 1e-3
  np.testing.assert_allclose(a[~parallel][:, :3], b[~parallel][:, :3], atol=1e-5)
  mask = Decoder(**DEC)._full_mask(texts, 8, 0, 8, parallel)["mask"]
  np.testing.assert_array_equal(mask[0, 0], np.ones((8, 8), bool))
  np.testing.assert_array_equal(mask[1, 0], np.tril(np.ones((8, 8), bool)))


def test_prefix_lm_mask():
  """Prefix positions see each other both ways; the tokens see the prefix and causally."""
  dec = Decoder(**DEC, cross_attention=False)
  prefix = jax.random.normal(jax.random.key(0), (2, 3, 32))
  tokens = jnp.asarray(TEXTS[:2])
  params = dec.init(jax.random.key(1), tokens, prefix=prefix)["params"]
  run = jax.jit(lambda pr, t: dec.apply({"params": params}, t, prefix=pr))
  (a, out_a), (b, out_b) = run(prefix, tokens), run(prefix.at[:, 2].add(jax.random.normal(jax.random.key(2), (2, 32))), tokens)
  assert np.max(np.abs(out_a["prefix_features"][:, 0] - out_b["prefix_features"][:, 0])) > 1e-3
  assert np.max(np.abs(a[:, 0] - b[:, 0])) > 1e-3
  (c, out_c) = run(prefix, tokens.at[:, 5:].set(77))
  np.testing.assert_allclose(out_a["prefix_features"], out_c["prefix_features"], atol=1e-6)
  np.testing.assert_allclose(a[:, :5], c[:, :5], atol=1e-5)  # `tokens` are the inputs here
  assert np.max(np.abs(a[:, 5:] - c[:, 5:])) > 1e-3


def test_token_loss_smoothing_and_pad():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 4, 5)), jnp.float32)
  targets = jnp.array([[3, 1, 0, 0], [2, 4, 1, 0]], jnp.int32)
  s = 0.1
  loss, metrics = generative.token_loss(logits, targets, s)
  logp = np.asarray(jax.nn.log_softmax(logits))
  terms = [-(1 - s) * logp[b, i, t] - s * logp[b, i].mean()
           for b in range(2) for i, t in enumerate(targets[b]) if t != 0]
  np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-5)
  nll = [-logp[b, i, t] for b in range(2) for i, t in enumerate(targets[b]) if t != 0]
  np.testing.assert_allclose(metrics["caption/nll"], np.mean(nll), rtol=1e-5)
  # Logits at pad targets do not matter.
  loss2, _ = generative.token_loss(logits.at[0, 2:].set(9.0).at[1, 3].set(-9.0), targets, s)
  np.testing.assert_allclose(loss, loss2, rtol=1e-6)


def test_coca_loss_is_weighted_sum(setups):
  obj, params, images, texts = setups["coca"]
  batch = {"image": images, "text": texts}
  con, cap, metrics = obj.loss_parts(params, batch, jax.random.key(0))
  loss, metrics = obj.loss_fn(params, batch, jax.random.key(0))
  assert obj.contrastive_weight == 1.0 and obj.caption_weight == 2.0
  np.testing.assert_allclose(loss, 1.0 * con + 2.0 * cap, rtol=1e-6)
  np.testing.assert_allclose(metrics["contrastive_loss"], con, rtol=1e-6)
  np.testing.assert_allclose(metrics["caption_loss"], cap, rtol=1e-6)
  zimg, ztxt = obj.embed_images(params, images), obj.embed_texts(params, texts)
  np.testing.assert_allclose(jnp.linalg.norm(zimg, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(ztxt, axis=-1), 1.0, rtol=1e-5)


def test_config_errors():
  c = _config("cappa")
  c.model.decoder.vocab_size = 100
  model = get_model(c.model_name, **c.model.to_dict())
  with pytest.raises(config_lib.ConfigError, match=r"vocab_size=100.*has 128 pieces"):
    generative.Captioning(c, model, None)
  c.model.decoder.vocab_size = 128
  c.objective.micro_batches = 2
  with pytest.raises(config_lib.ConfigError, match="GradCache is implemented for the contrastive"):
    generative.Captioning(c, get_model(c.model_name, **c.model.to_dict()), None)
  c.input.tokenizer = None
  with pytest.raises(config_lib.ConfigError, match="input.tokenizer"):
    generative.Captioning(c, model, None)
  with pytest.raises(config_lib.ConfigError, match="parallel_fraction"):
    _config("cappa", parallel_fraction=1.5)
  with pytest.raises(config_lib.ConfigError, match="label_smoothing"):
    _config("cappa", label_smoothing=1.0)


def test_sharded_loss_and_grad_equal_single_device():
  """The captioner's loss and gradients on a data=4 x fsdp=2 mesh (params FSDP-sharded by
  their logical names) equal the single-device ones, parallel prediction included."""
  mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  obj, params, images, texts = _setup("cappa", mesh, depth=1, parallel_fraction=0.5)
  images = jnp.concatenate([images, images[::-1]])
  texts = jnp.concatenate([texts, texts[::-1]])
  batch = {"image": images, "text": texts}
  rng = jax.random.key(3)
  grad_fn = jax.value_and_grad(obj.loss_fn, has_aux=True)
  (ref_loss, _), ref_grads = jax.jit(grad_fn)(params, batch, rng)

  model = obj.model
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(None)):
    boxed = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, images[:1],
                                              texts[:1], train=False)["params"])
    param_sh = sharding.logical_shardings(boxed, mesh)
    assert any(s.spec != P() for s in jax.tree.leaves(param_sh))  # FSDP really shards
    sharded_params = jax.device_put(params, param_sh)
    sharded_batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    (loss, _), grads = jax.jit(grad_fn)(sharded_params, sharded_batch, rng)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), grads,
               ref_grads)
