"""Generative models and objectives: decoder masks, KV-cache decoding, losses, sharding."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from big_mm import config as config_lib, decoding, objectives, sharding
from big_mm.models import get_model
from big_mm.evaluators import scoring
from big_mm.input.tokenizer import Tokenizer
from big_mm.models.decoder import Decoder, shift_right
from big_mm.objectives import Context, generative, get_objective

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
    "text_prefix": ("captioning", "captioner", dict(image=IMG, decoder=DEC, prefix_lm=True,
                                                    text_prefix_len=4)),
}
SHARED = ("cappa", "prefix_lm", "coca")  # the kinds every shared test runs


def _model(kind, depth=None, **changes):
  _, model_name, model = MODELS[kind]
  if depth is not None:
    model = dict(model, decoder=dict(DEC, depth=depth))
  return get_model(model_name, **{**model, **changes})


def _context(mesh=None, **changes):
  """What the trainer would give the objective for 8-token texts of 32 x 32 images."""
  return Context(**{**dict(mesh=mesh, batch_size=8, text_len=8, image_size=(32, 32),
                           tokenizer=Tokenizer(TOKENIZER)), **changes})


def _setup(kind, mesh=None, depth=None, **objective):
  model = _model(kind, depth)
  obj = get_objective(MODELS[kind][0])(model, _context(mesh), **objective)
  images = jax.random.normal(jax.random.key(1), (len(TEXTS), 32, 32, 3))
  params = sharding.unbox(model.init({"params": jax.random.key(0)}, images[:1], TEXTS[:1],
                                     train=False)["params"])
  return obj, params, images, jnp.asarray(TEXTS)


@pytest.fixture(scope="module")
def setups():
  return {k: _setup(k) for k in SHARED}


@pytest.fixture(scope="module")
def text_prefix():
  return _setup("text_prefix", depth=1)


@pytest.mark.parametrize("kind", SHARED)
def test_causal(setups, kind):
  """Teacher-forced logits at position i do not depend on the tokens after i."""
  obj, params, images, texts = setups[kind]
  changed = texts.at[:, 4:].set(77)
  logits = jax.jit(obj._logits)
  a, b = logits(params, images, texts), logits(params, images, changed)
  # Target 4 is input 5: positions <= 4 see only inputs <= 4 (= text[:4]).
  np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-5)
  assert np.max(np.abs(a[:, 5:] - b[:, 5:])) > 1e-3


@pytest.mark.parametrize("kind", SHARED)
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
  moved = prefix.at[:, 2].add(jax.random.normal(jax.random.key(2), (2, 32)))
  (a, out_a), (b, out_b) = run(prefix, tokens), run(moved, tokens)
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
  model = _model("cappa")
  with pytest.raises(config_lib.ConfigError, match=r"vocab_size=100.*has 128 pieces"):
    generative.Captioning(_model("cappa", decoder=dict(DEC, vocab_size=100)), _context())
  with pytest.raises(config_lib.ConfigError, match="GradCache is implemented for the contrastive"):
    generative.Captioning(model, _context(), micro_batches=2)
  with pytest.raises(config_lib.ConfigError, match="input.tokenizer"):
    generative.Captioning(model, _context(tokenizer=None))
  with pytest.raises(config_lib.ConfigError, match="parallel_fraction"):
    objectives.settings(dict(name="captioning", parallel_fraction=1.5))
  with pytest.raises(config_lib.ConfigError, match="label_smoothing"):
    objectives.settings(dict(name="captioning", label_smoothing=1.0))
  with pytest.raises(config_lib.ConfigError, match="both 0"):
    objectives.settings(dict(name="coca", contrastive_weight=0, caption_weight=0.0))


@pytest.mark.parametrize("kind,key,value", [
    ("cappa", "loss", "softmax"), ("cappa", "strategy", "ring"),
    ("cappa", "implementation", "pallas"), ("cappa", "caption_weight", 1.0),
    ("coca", "micro_batches", 2), ("coca", "parallel_fraction", 0.5),
    ("coca", "num_visible", 10)])
def test_other_objectives_settings_are_unknown_keys(kind, key, value):
  """Settings the objective does not have are refused (when the config loads and when the
  objective is built), not silently ignored."""
  name = MODELS[kind][0]
  match = rf"Unknown config key 'objective.{key}' for objective.name='{name}'"
  with pytest.raises(config_lib.ConfigError, match=match):
    objectives.settings({"name": name, key: value})
  with pytest.raises(config_lib.ConfigError, match=match):
    get_objective(name)(_model(kind), _context(), **{key: value})


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
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(None, mesh)):
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


# ---- prefix-LM with a text prefix --------------------------------------------------------

# Text prefixes of the 4 examples (0 = pad); the last one is empty.
PREFIX = np.array([[3, 4, 0, 0], [7, 8, 9, 0], [5, 0, 0, 0], [0, 0, 0, 0]], np.int32)


def _prefix_features(obj, params, images, texts, prefix):
  """Decoder features of the prefix positions [image tokens; text prefix]."""
  def run(m, images, texts, prefix):
    enc = m.encode(images, prefix)
    return m.dec(shift_right(texts), None, prefix=enc["tokens"], prefix_tokens=enc["prefix"])[1]
  return obj.model.apply({"params": params}, images, texts, prefix, method=run)[
      "prefix_features"]


def test_text_prefix_attention(text_prefix):
  """The caption is causal and reads the text prefix; the prefix (image tokens + text) is
  bidirectional; pad slots are invisible: a padded prefix equals the unpadded one and no
  prefix equals an all-pad one."""
  obj, params, images, texts = text_prefix
  prefix = jnp.asarray(PREFIX)
  logits = jax.jit(obj._logits)
  a = logits(params, images, texts, prefix)
  b = logits(params, images, texts.at[:, 4:].set(77), prefix)
  np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-5)
  assert np.max(np.abs(a[:, 5:] - b[:, 5:])) > 1e-3
  # Example 0's second prefix token changes its caption logits and the features of the image
  # tokens and the first prefix token before it; the other examples are untouched.
  changed = prefix.at[0, 1].set(11)
  c = logits(params, images, texts, changed)
  assert np.max(np.abs(a[0, 0] - c[0, 0])) > 1e-3
  np.testing.assert_allclose(a[1:], c[1:], atol=1e-6)
  n = obj.model.apply({"params": params}, images, method=type(obj.model).encode)["tokens"].shape[1]
  feats = jax.jit(lambda p: _prefix_features(obj, params, images, texts, p))
  fa, fc = feats(prefix), feats(changed)
  assert fa.shape[1] == n + 4
  assert np.max(np.abs(fa[0, 0] - fc[0, 0])) > 1e-3          # an image token
  assert np.max(np.abs(fa[0, n] - fc[0, n])) > 1e-3          # prefix slot 0 sees slot 1
  # Pad slots are invisible: the prefix without them (fewer posemb rows) gives the same
  # caption logits.
  np.testing.assert_allclose(logits(params, images[:1], texts[:1], prefix[:1, :2]), a[:1],
                             atol=1e-5)
  no_prefix = logits(params, images, texts, None)
  np.testing.assert_allclose(no_prefix, logits(params, images, texts, jnp.zeros_like(prefix)),
                             atol=1e-6)
  np.testing.assert_allclose(no_prefix[3], a[3], atol=1e-5)  # example 3's prefix is all pad
  assert np.max(np.abs(no_prefix[0] - a[0])) > 1e-3


def test_text_prefix_parallel_rows(text_prefix):
  """CapPa parallel rows still ignore the caption tokens with a text prefix."""
  obj, params, images, texts = text_prefix
  parallel = jnp.array([True, False, True, False])
  run = jax.jit(lambda t: obj.model.apply({"params": params}, images, t, prefix=PREFIX,
                                          parallel=parallel)[0])
  a, b = run(texts), run(texts.at[:, 2:].set(77))
  np.testing.assert_allclose(a[parallel], b[parallel], atol=1e-6)
  np.testing.assert_allclose(a[~parallel][:, :3], b[~parallel][:, :3], atol=1e-5)
  assert np.max(np.abs(a[~parallel][:, 3:] - b[~parallel][:, 3:])) > 1e-3


def test_text_prefix_decoding_equals_full(text_prefix):
  """KV-cache steps with a text prefix give the full pass's logits, and beam search gives
  the tokens of a decoder that recomputes the full pass at every step."""
  obj, params, images, texts = text_prefix
  prefix = jnp.asarray(PREFIX)
  full = jax.jit(obj._logits)(params, images, texts, prefix)
  enc = obj.encode(params, images, prefix)
  cache = obj.init_cache(params, enc, texts.shape[1])
  for leaf in jax.tree.leaves((enc, cache)):
    assert leaf.shape[0] == len(texts)
  inputs = shift_right(texts)
  step = jax.jit(obj.decode_step)
  for pos in range(texts.shape[1]):
    logits, cache = step(params, enc, cache, inputs[:, pos], jnp.int32(pos))
    np.testing.assert_allclose(logits, full[:, pos], atol=2e-5, rtol=1e-5)

  class Recompute:
    """The same model without a KV cache: each step reruns the teacher-forced pass."""
    vocab_size, max_text_len = obj.vocab_size, obj.max_text_len

    def encode(self, params, images, prefix=None):
      return {"images": images, "prefix": prefix}

    def init_cache(self, params, enc, max_len):
      return {"buf": jnp.zeros((enc["images"].shape[0], max_len), jnp.int32)}

    def decode_step(self, params, enc, cache, tokens, position):
      buf = jax.lax.dynamic_update_slice_in_dim(cache["buf"], tokens[:, None], position, 1)
      targets = jnp.concatenate([buf[:, 1:], buf[:, :1]], axis=1)  # its inputs are `buf`
      logits = obj._logits(params, enc["images"], targets, enc["prefix"])
      return jax.lax.dynamic_index_in_dim(logits, position, 1, keepdims=False), {"buf": buf}

  # Beam search (enc and cache rows repeated and reordered), against the recomputing decoder.
  got = decoding.beam_search(obj, params, images, prefix=prefix, beam_size=3)
  want = decoding.beam_search(Recompute(), params, images, prefix=prefix, beam_size=3)
  np.testing.assert_array_equal(got, want)


def test_text_prefix_loss_and_likelihood(setups, text_prefix):
  """The loss is the token loss of the caption only (the prefix is never a target), with the
  prefix as conditioning; log_likelihood counts caption tokens only."""
  obj, params, images, texts = text_prefix
  prefix = jnp.asarray(PREFIX)
  batch = {"image": images, "text": texts, "prefix": prefix}
  loss, _ = obj.loss_fn(params, batch, jax.random.key(0))
  want, _ = generative.token_loss(obj._logits(params, images, texts, prefix), texts)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  no_prefix, _ = obj.loss_fn(params, {"image": images, "text": texts}, jax.random.key(0))
  assert abs(float(loss) - float(no_prefix)) > 1e-4
  logp, n = obj.log_likelihood(params, images, texts, prefix)
  np.testing.assert_array_equal(n, [4, 2, 8, 3])
  full = jax.nn.log_softmax(obj._logits(params, images, texts, prefix))
  ref = jnp.take_along_axis(full, texts[..., None], -1)[..., 0]
  np.testing.assert_allclose(logp, jnp.sum(jnp.where(texts != 0, ref, 0), 1), rtol=1e-5)
  # The scoring evaluator's prompt scorer passes the prefix on.
  logp = obj.log_likelihood(params, images, jnp.broadcast_to(texts[0], texts.shape), prefix)[0]
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:4])
  scores = scoring.prompt_scorer(obj, mesh)(params, images, texts[:2], prefix)
  np.testing.assert_allclose(scores[:, 0], logp, rtol=1e-5)
  plain_obj, plain_params = setups["prefix_lm"][:2]
  with pytest.raises(ValueError, match="has no text prefix"):
    plain_obj.log_likelihood(plain_params, images, texts, prefix)


def test_text_prefix_config_errors():
  for kind, changes, match in [
      ("text_prefix", dict(prefix_column="question"), r"prefix_len=0: a text prefix needs both"),
      ("text_prefix", dict(prefix_len=4), r"prefix_column=None and input.prefix_len=4"),
      ("text_prefix", dict(prefix_column="question", prefix_len=5),
       r"input.prefix_len=5 but model.text_prefix_len=4"),
      ("prefix_lm", dict(prefix_column="question", prefix_len=2),
       r"input.prefix_len=2 but model.text_prefix_len=0"),
      ("cappa", dict(prefix_column="question", prefix_len=2),
       r"input.prefix_len=2 but model.text_prefix_len=0"),
      ("text_prefix", dict(prefix_column="question", prefix_len=4, modalities=("rgb", "text")),
       r"not read with input.modalities"),
  ]:
    with pytest.raises(config_lib.ConfigError, match=match):
      generative.Captioning(_model(kind), _context(**changes))
  # CoCa reads no text prefix: refused when the config loads.
  c = config_lib.defaults()
  c.total_steps = 1
  c.objective = dict(name="coca")
  c.input.update(prefix_column="question", prefix_len=2)
  with pytest.raises(config_lib.ConfigError, match=r"read only by captioners with a text prefix.*'coca'"):
    config_lib.validate(c)
  generative.Captioning(_model("text_prefix"), _context(prefix_column="question", prefix_len=4))
