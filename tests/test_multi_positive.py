"""Multi-positive contrastive losses (several captions per image, input.captions_per_example):
every strategy equals a plain jnp reference (values and grads, float32) on one device and on 8
simulated devices; k = 1 is the one-caption loss; the objective trains on [B, k, L] texts.
(Apart from tests/test_contrastive.py so that the Matryoshka work there and this stay separate.)"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from big_mm import config as config_lib, sharding, train
from big_mm.objectives import Contrastive, losses
from conftest import tiny_config

TB = {"sigmoid": (10.0, -10.0), "softmax": (14.0, 0.5)}


def _emb(seed, n, k, d):
  """Normalised zimg [n, d] and ztxt [n, k, d], each caption correlated with its image."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  zi = jax.random.normal(k1, (n, d), jnp.float32)
  zt = jax.random.normal(k2, (n, k, d), jnp.float32) + 0.7 * zi[:, None]
  norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  return norm(zi), norm(zt)


def _plain_reference(loss, zi, zt, t, b):
  """The multi-positive losses written pair by pair, in float64 numpy."""
  zi, zt, t, b = np.float64(zi), np.float64(zt), float(t), float(b)
  n, k, _ = zt.shape
  logits = t * np.einsum("id,jcd->ijc", zi, zt) + b  # [image, image of the caption, caption]
  own = np.eye(n, dtype=bool)[:, :, None].repeat(k, axis=2)
  if loss == "sigmoid":
    label = np.where(own, 1.0, -1.0)
    return np.sum(np.log1p(np.exp(-label * logits))) / (n * k)
  lse = lambda x, axis: np.log(np.sum(np.exp(x), axis=axis))
  i2t = np.mean(lse(logits.reshape(n, n * k), 1) - logits[own].reshape(n, k).mean(1))
  t2i = np.mean(lse(logits, 0) - logits[own].reshape(n, k))
  return 0.5 * (i2t + t2i)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_references_match_plain_numpy_and_k1_is_the_one_caption_loss(loss):
  t, b = TB[loss]
  zi, zt = _emb(0, 6, 3, 8)
  ref = losses.sigmoid_loss_multi if loss == "sigmoid" else losses.softmax_loss_multi
  np.testing.assert_allclose(ref(zi, zt, t, b), _plain_reference(loss, zi, zt, t, b),
                             rtol=1e-5)
  # k = 1: the reference is the one-caption loss (to float32 rounding), and contrastive_loss
  # on [B, 1, D] is the one-caption computation itself, bit for bit.
  one = losses.sigmoid_loss if loss == "sigmoid" else losses.softmax_loss
  zt1 = zt[:, :1]
  np.testing.assert_allclose(ref(zi, zt1, t, b), one(zi, zt1[:, 0], t, b), rtol=1e-7)
  multi = losses.contrastive_loss(zi, zt1, t, b, loss=loss, strategy="local")
  assert float(multi) == float(losses.contrastive_loss(zi, zt1[:, 0], t, b, loss=loss,
                                                       strategy="local"))
  # The k captions are all positives: swapping which caption is "first" changes nothing.
  np.testing.assert_allclose(ref(zi, zt[:, ::-1], t, b), ref(zi, zt, t, b), rtol=1e-6)


def _value_and_grad(loss, strategy, mesh, zi, zt, t, b, implementation="xla"):
  fn = functools.partial(losses.contrastive_loss, loss=loss, strategy=strategy, mesh=mesh,
                         implementation=implementation)
  args = (zi, zt, jnp.float32(t), jnp.float32(b))
  if mesh is not None:
    sh, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    args = tuple(jax.device_put(a, s) for a, s in zip(args, (sh, sh, rep, rep)))
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(*args)


# On one device "local" is the reference itself; the others run their shard_map code.
@pytest.mark.parametrize("strategy,devices", [("all_gather", 1), ("ring", 1), ("local", 8),
                                              ("all_gather", 8), ("ring", 8)])
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_every_strategy_equals_the_reference(loss, strategy, devices):
  mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices],
                       axis_types=(jax.sharding.AxisType.Auto,))
  zi, zt = _emb(1, 16, 3, 8)
  t, b = TB[loss]
  ref = losses.sigmoid_loss_multi if loss == "sigmoid" else losses.softmax_loss_multi
  want_v, want_g = jax.value_and_grad(ref, argnums=(0, 1, 2, 3))(zi, zt, jnp.float32(t),
                                                                 jnp.float32(b))
  got_v, got_g = _value_and_grad(loss, strategy, mesh, zi, zt, t, b)
  np.testing.assert_allclose(got_v, want_v, rtol=1e-5, atol=1e-6)
  for name, g, w in zip(("zimg", "ztxt", "t", "b"), got_g, want_g):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6,
                               err_msg=f"grad {name}")
  assert float(jnp.abs(want_g[1]).max()) > 1e-3 and abs(float(want_g[2])) > 1e-4


def test_pallas_is_refused_for_several_captions():
  zi, zt = _emb(2, 8, 2, 8)
  with pytest.raises(ValueError, match="implementation='xla'"):
    losses.contrastive_loss(zi, zt, 10.0, -10.0, loss="sigmoid", strategy="local",
                            implementation="pallas")
  # One caption per image runs the fused kernel as before.
  np.testing.assert_allclose(
      losses.contrastive_loss(zi, zt[:, :1], 10.0, -10.0, loss="sigmoid", strategy="local",
                              implementation="pallas"),
      losses.sigmoid_loss(zi, zt[:, 0], 10.0, -10.0), rtol=1e-5)


def test_objective_contrasts_k_captions_per_image(data_dir):
  """[B, k, L] texts on the 8-device mesh: the loss is the multi-positive reference of the
  towers' embeddings (the text tower embeds all B*k captions); GradCache gives the same loss
  and the reference's gradients."""
  setup = train.build(tiny_config(data_dir, batch_size=16))
  objective, model = setup.objective, setup.model
  k1, k2 = jax.random.split(jax.random.PRNGKey(3))
  batch = {"image": jax.random.normal(k1, (16, 32, 32, 3), jnp.float32),
           "text": jax.random.randint(k2, (16, 3, 8), 1, 128, jnp.int32)}
  with train.use_mesh(setup):
    params = sharding.unbox(jax.jit(objective.init_params)(jax.random.key(0)))
    batch = jax.device_put(batch, sharding.batch_sharding(setup.mesh))

    def reference(params):
      z, out = model.apply({"params": params}, {"image": batch["image"],
                                                "text": batch["text"].reshape(48, 8)})
      return losses.sigmoid_loss_multi(z["image"], z["text"].reshape(16, 3, -1), out["t"],
                                       out["b"])

    rng = jax.random.key(5)
    want_loss, want_grads = jax.jit(jax.value_and_grad(reference))(params)
    loss, metrics = jax.jit(objective.loss_fn)(params, batch, rng)
    # GradCache runs the towers micro-batch by micro-batch, [B/2, k, L] each.
    gradcache = Contrastive(model, objective.ctx, **{
        **{k: v for k, v in setup.config.objective.items() if k != "name"}, "micro_batches": 2})
    (gc_loss, _), gc_grads = jax.jit(gradcache.value_and_grad)(params, batch, rng)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(gc_loss, want_loss, rtol=1e-5)
  assert -1 <= float(metrics["img_txt_cos/pos"]) <= 1
  leaves = jax.tree_util.tree_leaves_with_path(want_grads)
  largest = max(float(np.abs(w).max()) for _, w in leaves)
  for (path, w), g in zip(leaves, jax.tree.leaves(gc_grads)):
    # Leaves whose true gradient is 0 (attention key biases) hold rounding noise: their
    # scale is floored at 1% of the largest gradient (as in tests/test_contrastive.py).
    scale = max(float(np.abs(w).max()), 0.01 * largest)
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
  assert float(jnp.abs(want_grads["txt"]["Embed_0"]["embedding"]).max()) > 1e-4


def test_captions_per_example_config_errors(data_dir):
  with pytest.raises(config_lib.ConfigError, match="captions_per_example must be a positive"):
    tiny_config(data_dir, **{"input.captions_per_example": 0})
  with pytest.raises(config_lib.ConfigError, match="needs objective.implementation='xla'"):
    tiny_config(data_dir, **{"input.captions_per_example": 2,
                             "objective.implementation": "pallas"})
  with pytest.raises(config_lib.ConfigError, match="only objective.name='contrastive' reads"):
    tiny_config(data_dir, **{"input.captions_per_example": 2,
                             "objective": {"name": "captioning"}, "model_name": "captioner"})
  assert tiny_config(data_dir, **{"input.captions_per_example": 3,
                                  "input.split_long_captions": True}).input.captions_per_example == 3


def test_digits_multicaption_table(tmp_path):
  """configs/demo_multipos.py's data: every digits training image with 3 different captions
  of its digit, none a held-out (zero-shot prompt) template."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  from data import digits_captions, digits_multicaption  # pylint: disable=g-import-not-at-top
  table = pq.read_table(digits_multicaption.build(str(tmp_path / "t.parquet"))).to_pydict()
  assert len(table["image"]) == 1497
  held_out = {t.format(w=w) for t in digits_captions.HELD_OUT_TEMPLATES
              for w in digits_captions.WORDS}
  for caps, paragraph, label in zip(table["captions"], table["paragraph"], table["label"]):
    assert len(set(caps)) == 3 and not set(caps) & held_out
    assert all(digits_captions.WORDS[label] in c or str(label) in c for c in caps)
    assert paragraph == " ".join(f"{c}." for c in caps)
