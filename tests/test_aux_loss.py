"""The aux_loss/* convention (big_mm/models/aux_loss.py) in every objective's loss.

A stand-in layer term: every MlpBlock sows 0.1 * mean(output^2) (through flax's method
interception, so the real models run unchanged). Each objective's loss must then be its own
loss plus the term, report it as the metric `aux_loss/toy`, and differentiate through it;
without sown terms its loss, metrics and gradients stay exactly what they were.
"""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_mm import config as config_lib
from big_mm import sharding, train
from big_mm.models import layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "data", "digits_spm.model")
TINY = dict(width=32, depth=1, mlp_dim=64, num_heads=2)
B = 8


def _sow_from_every_mlp(next_fun, args, kwargs, context):
  y = next_fun(*args, **kwargs)
  if isinstance(context.module, layers.MlpBlock) and context.method_name == "__call__":
    context.module.sow(layers.AUX_LOSS, "toy", 0.1 * jnp.mean(jnp.square(y)))
  return y


def _setup(config_file, **changes):
  """A demo recipe shrunk to TINY towers on one device."""
  user = config_lib.load_file(os.path.join(ROOT, "configs", config_file))
  user.batch_size = B
  user.evals = {}
  user.input.tokenizer = TOKENIZER
  user.input.text_len = 8
  for key, value in changes.items():
    node = user
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return train.build(config_lib.load(user), devices=jax.devices()[:1])


def _image_text_batch():
  k1, k2 = jax.random.split(jax.random.key(3))
  text = jax.random.randint(k2, (B, 8), 2, 128, jnp.int32).at[:, 6:].set(0)
  return {"image": jax.random.normal(k1, (B, 16, 16, 3)), "text": text}


def _case(kind):
  """-> (setup, params, batch)."""
  img = dict(TINY, patch_size=(4, 4))
  if kind in ("contrastive", "gradcache"):
    setup = _setup("demo.py", **{"model.towers.image": dict(img, pool="map"),
                                 "model.out_dim": dict(image=16, text=16),
                                 "model.towers.text": dict(TINY, vocab_size=128),
                                 "objective.micro_batches": 2 if kind == "gradcache" else 1})
  elif kind == "captioning":
    setup = _setup("demo_cappa.py", **{"model.image": img, "objective.parallel_fraction": 0.5,
                                       "model.decoder": dict(TINY, vocab_size=128, max_len=8)})
  elif kind == "coca":
    setup = _setup("demo_coca.py", **{"model.image": img,
                                      "model.text": dict(TINY, vocab_size=128, max_len=8)})
  else:
    setup = _setup("demo_multimae.py", **{
        "model.image_size": 16, "model.encoder": TINY,
        "model.decoder": dict(width=16, depth=1, num_heads=2), "objective.num_visible": 12})
  batch = _image_text_batch()
  if kind == "multimae":
    rng = np.random.default_rng(0)
    batch = {"image": batch["image"],
             "depth": jnp.asarray(rng.uniform(1, 9, (B, 16, 16)), jnp.float32),
             "semseg": jnp.asarray(rng.integers(0, 4, (B, 16, 16)), jnp.int32)}
    visible = jnp.zeros((B, 12), jnp.int32)
    inputs = {"rgb": batch["image"], "depth": batch["depth"], "semseg": batch["semseg"]}
    variables = setup.model.init(jax.random.key(0), inputs, visible, jnp.ones((B, 12), bool))
  elif kind in ("contrastive", "gradcache"):
    variables = setup.model.init(jax.random.key(0), batch)
  else:
    variables = setup.model.init(jax.random.key(0), batch["image"], batch["text"])
  return setup, sharding.unbox(variables["params"]), batch


@pytest.mark.parametrize("kind", ["contrastive", "gradcache", "captioning", "coca", "multimae"])
def test_objectives_add_and_report_aux_losses(kind):
  setup, params, batch = _case(kind)
  objective = setup.objective
  # The trainer's gradient: GradCache's own value_and_grad where the objective has one.
  grad_fn = getattr(objective, "value_and_grad", None) or jax.value_and_grad(
      objective.loss_fn, has_aux=True)
  rng = jax.random.key(5)

  def run(params):
    plain = grad_fn(params, batch, rng)
    with nn.intercept_methods(_sow_from_every_mlp):
      sown = grad_fn(params, batch, rng)
      aux_grad = jax.grad(lambda p: objective.loss_fn(p, batch, rng)[1]["aux_loss/toy"])(params)
    return plain, sown, aux_grad

  with train.use_mesh(setup):
    ((loss0, metrics0), grads0), ((loss1, metrics1), grads1), aux_grad = jax.jit(run)(params)
  assert not any(k.startswith("aux_loss/") for k in metrics0)
  assert sorted(metrics1) == sorted([*metrics0, "aux_loss/toy"])
  term = float(metrics1["aux_loss/toy"])
  assert term > 1e-4
  np.testing.assert_allclose(loss1, loss0 + term, rtol=1e-5)
  for k, v in metrics0.items():
    np.testing.assert_allclose(metrics1[k], v, rtol=1e-5, err_msg=k)
  # The gradient is the objective's own plus the term's.
  largest = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads1))
  for path, g1 in jax.tree_util.tree_leaves_with_path(grads1):
    g0 = _at(grads0, path)
    ga = _at(aux_grad, path)
    np.testing.assert_allclose(g1, g0 + ga, rtol=1e-4, atol=1e-6 * largest,
                               err_msg=jax.tree_util.keystr(path))
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(aux_grad)) > 1e-4


def _at(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree
