"""FILIP: the token-wise similarity kernel against its reference, the loss of every strategy
and implementation against the plain-jnp reference (1 and 8 devices), the objective and its
evaluators' token-wise scores."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from big_mm.kernels import contrastive as kernels
from big_mm.kernels import filip as filip_kernels
from big_mm.objectives import filip_loss

LI, LT, D = 4, 5, 8  # image tokens, text tokens, feature dim


def _tokens(seed, n, length, pad_from=None):
  """Flattened normalised token rows [n, length * D]; with pad_from, row i keeps its first
  pad_from[i] tokens and the rest are padding (zero)."""
  x = jax.random.normal(jax.random.key(seed), (n, length, D))
  x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  mask = None if pad_from is None else jnp.arange(length)[None] < jnp.asarray(pad_from)[:, None]
  return filip_kernels.flatten_tokens(x, mask)


def _batch(n, seed=0):
  ximg = _tokens(seed, n, LI)
  xtxt = _tokens(seed + 1, n, LT, pad_from=[1 + i % LT for i in range(n)])
  return ximg, xtxt


def _close(got, want, tol=2e-5):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol)


def test_similarity_is_the_token_wise_max_mean():
  # One image of 2 tokens, one caption of 3 tokens whose last is padding, by hand.
  img = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
  txt = jnp.array([[[0.6, 0.8], [-1.0, 0.0], [0.0, 0.0]]])  # third token: padding
  xa, xb = img.reshape(1, -1), txt.reshape(1, -1)
  # cosines: patch0 -> (0.6, -1.0), patch1 -> (0.8, 0.0); the pad token never counts.
  i2t = filip_kernels.similarities_reference(xa, xb, 2, 3, 2, reduce="a")
  t2i = filip_kernels.similarities_reference(xa, xb, 2, 3, 2, reduce="b")
  _close(i2t, [[(0.6 + 0.8) / 2]])
  _close(t2i, [[(0.8 + 0.0) / 2]])
  for reduce, want in (("a", i2t), ("b", t2i)):
    sim = filip_kernels.TokenwiseMax(2, 3, 2, reduce)
    _close(sim(xa, xb), want)
    _close(sim.diagonal(xa, xb), want[0])


@pytest.mark.parametrize("reduce", ["a", "b", "both"])
def test_kernel_block_lse_equals_reference(reduce):
  ximg, xtxt = filip_kernels.same_width(*_batch(11))
  sim = filip_kernels.TokenwiseMax(LI, LT, D, reduce)
  cfg = kernels.kernel_config("cpu", tile_rows=8, tile_cols=8)  # several, partly padded tiles
  t, b = 3.0, -0.5

  def reference(zi, zt):
    zi, zt = zi[:, :LI * D], zt[:, :LT * D]
    logits = t * filip_kernels.similarities_reference(zi, zt, LI, LT, D, reduce) + b
    return jax.nn.logsumexp(logits, axis=1), jax.nn.logsumexp(logits, axis=0)

  def fused(zi, zt):
    return kernels.block_lse(zi, zt, t, b, similarity=sim, config=cfg)

  w_r, w_c = jnp.linspace(0.5, 1.5, 11), jnp.linspace(-1.0, 1.0, 11)
  scalar = lambda f: lambda zi, zt: (lambda r, c: jnp.sum(w_r * r) + jnp.sum(w_c * c))(
      *f(zi, zt))
  for got, want in zip(fused(ximg, xtxt), reference(ximg, xtxt)):
    _close(got, want)
  for got, want in zip(jax.grad(scalar(fused), (0, 1))(ximg, xtxt),
                       jax.grad(scalar(reference), (0, 1))(ximg, xtxt)):
    _close(got, want)


def test_kernel_sigmoid_sum_equals_reference():
  ximg, xtxt = filip_kernels.same_width(*_batch(11, seed=3))
  sim = filip_kernels.TokenwiseMax(LI, LT, D, "both")
  cfg = kernels.kernel_config("cpu", tile_rows=8, tile_cols=8)

  def reference(zi, zt, t, b):
    zi, zt = zi[:, :LI * D], zt[:, :LT * D]
    logits = t * filip_kernels.similarities_reference(zi, zt, LI, LT, D) + b
    pos = jnp.eye(11, dtype=bool)
    return -jnp.sum(jax.nn.log_sigmoid(jnp.where(pos, logits, -logits)))

  fused = lambda zi, zt, t, b: kernels.block_sigmoid_sum(zi, zt, t, b, 0, similarity=sim,
                                                         config=cfg)
  args = (ximg, xtxt, 4.0, -2.0)
  _close(fused(*args), reference(*args), 1e-5)
  for got, want in zip(jax.grad(fused, (0, 1, 2, 3))(*args),
                       jax.grad(reference, (0, 1, 2, 3))(*args)):
    _close(got, want)


def _mesh():
  return jax.make_mesh((4, 2), ("data", "fsdp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_loss_equals_reference_every_strategy(loss, implementation):
  n = 16
  ximg, xtxt = _batch(n, seed=5)
  t, b = 5.0, -1.0
  ref = functools.partial(filip_loss.filip_loss_reference, tokens=(LI, LT), dim=D, loss=loss)
  want, want_grads = jax.value_and_grad(ref, (0, 1, 2, 3))(ximg, xtxt, t, b)
  cfg = (kernels.kernel_config("cpu", tile_rows=8, tile_cols=8)
         if implementation == "pallas" else None)
  mesh = _mesh()
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
  for strategy, m in (("local", None), ("local", mesh), ("all_gather", mesh), ("ring", mesh)):
    fn = functools.partial(filip_loss.filip_loss, tokens=(LI, LT), dim=D, loss=loss,
                           strategy=strategy, mesh=m, implementation=implementation,
                           kernel_config=cfg)
    args = (ximg, xtxt) if m is None else (shard(ximg), shard(xtxt))
    got, grads = jax.jit(jax.value_and_grad(fn, (0, 1, 2, 3)))(*args, t, b)
    _close(got, want, 1e-5)
    for g, w in zip(grads, want_grads):
      _close(g, w)


def _objective(mesh=None, batch_size=8, **settings):
  from big_mm.models.towers import Towers
  from big_mm.objectives import Context, filip
  model = Towers(towers=dict(
      image=dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=(4, 4), pool="map"),
      text=dict(width=16, depth=1, mlp_dim=32, num_heads=2, vocab_size=32)),
      out_dim=8, temperature_init=10.0, bias_init=-5.0)
  ctx = Context(mesh=mesh, batch_size=batch_size, text_len=6, image_size=(8, 8))
  return filip.Filip(model, ctx, **settings)


def _example_batch(n):
  rng = np.random.default_rng(0)
  text = rng.integers(2, 32, (n, 6)).astype(np.int32)
  text[np.arange(6)[None] >= rng.integers(1, 7, n)[:, None]] = 0  # padded captions
  return {"image": rng.normal(size=(n, 8, 8, 3)).astype(np.float32), "text": text}


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_objective_loss_is_the_reference_on_its_token_features(loss):
  obj = _objective(loss=loss)
  assert obj.tokens == (4, 6) and obj.dim == 8  # 2x2 patches; 6 text positions
  params = nn.unbox(obj.init_params(jax.random.key(0)))
  batch = _example_batch(8)
  got, metrics = obj.loss_fn(params, batch, jax.random.key(1))
  ximg, xtxt = obj.embed_images(params, batch["image"]), obj.embed_texts(params, batch["text"])
  # Padding tokens are zero rows, real ones unit vectors.
  norms = np.linalg.norm(np.asarray(xtxt).reshape(8, 6, 8), axis=-1)
  np.testing.assert_allclose(norms, (batch["text"] != 0).astype(np.float32), atol=1e-5)
  want = filip_loss.filip_loss_reference(ximg, xtxt, metrics["t"], metrics["b"], tokens=(4, 6),
                                         dim=8, loss=loss)
  _close(got, want, 1e-5)
  # The evaluators' scores are the same similarities.
  for direction, reduce in (("img2txt", "a"), ("txt2img", "b")):
    _close(obj.similarity(np.asarray(ximg), np.asarray(xtxt), direction),
           filip_kernels.similarities_reference(ximg, xtxt, 4, 6, 8, reduce))


def test_image_token_dropping_keeps_a_random_subset():
  obj = _objective(image_token_keep=0.5)
  assert obj.tokens == (2, 6)
  image = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
  kept = np.asarray(obj._drop_image_tokens(image, jax.random.key(0)))
  assert kept.shape == (2, 2, 3)
  for row, full in zip(kept, np.asarray(image)):  # distinct patches of that image
    assert len({tuple(r) for r in row}) == 2 and all(tuple(r) in set(map(tuple, full))
                                                     for r in row)
  params = nn.unbox(obj.init_params(jax.random.key(0)))
  loss, _ = obj.loss_fn(params, _example_batch(8), jax.random.key(1))
  assert np.isfinite(loss)
  with pytest.raises(Exception, match="image_token_keep"):
    _objective(image_token_keep=0.0)


def test_filip_trains_and_its_evaluators_use_the_token_wise_similarity(tmp_path, data_dir,
                                                                        caplog):
  import logging
  from big_mm import train
  from configs import common
  from conftest import read_metrics, tiny_config
  evals = dict(zeroshot=dict(common.digits_zeroshot_eval(every_steps=0), every_steps=None),
               retrieval=dict(type="retrieval", split="test", pp_image=common.EVAL_PP))
  config = tiny_config(data_dir, objective=dict(name="filip", strategy="ring",
                                                image_token_keep=0.5), evals=evals,
                       total_steps=2)
  with caplog.at_level(logging.INFO, logger="big_mm"):
    train.train(config, str(tmp_path))
  final = read_metrics(str(tmp_path))[-1]
  for key in ("eval/zeroshot/accuracy", "eval/retrieval/txt2img/R@1"):
    assert 0.0 <= final[key] <= 1.0, (key, final)
  assert "evals.zeroshot: classifying by the objective's own (FILIP token-wise)" in caplog.text
  assert "evals.retrieval: ranking by the objective's own (FILIP token-wise)" in caplog.text


def test_recipe_configs_build_their_filip_objective():
  """configs/filip_b16.py (abstractly: shapes only) and the demo: the objective sees the
  paper's token counts and one token dim on both sides."""
  from big_mm import config as config_lib, models
  from big_mm.objectives import Context, filip
  for spec, image_size, text_len, want in (("configs/filip_b16.py", (224, 224), 77,
                                            ((196, 77), 256)),
                                           ("configs/demo_filip.py:keep=0.5", (32, 32), 24,
                                            ((32, 24), 64))):
    config = config_lib.load(config_lib.load_file(spec))
    model = models.get_model(config.model_name, **config.model.to_dict())
    settings = {k: v for k, v in config.objective.items() if k != "name"}
    obj = filip.Filip(model, Context(image_size=image_size, text_len=text_len), **settings)
    assert (obj.tokens, obj.dim) == want, spec
