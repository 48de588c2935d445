"""SigLIP 2 objective (big_mm/objectives/siglip2.py): with every part off it is the contrastive
objective; the unmasked tuning phase turns patch dropout off at its step; it trains."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from big_mm import config as config_lib
from big_mm import sharding
from big_mm.models.towers import Towers
from big_mm.objectives import Context, contrastive, siglip2

TOWERS = dict(
    image=dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=(4, 4), pool="map"),
    text=dict(width=16, depth=1, mlp_dim=32, num_heads=2, vocab_size=32))


def _model(patch_dropout=0.0):
  towers = {**TOWERS, "image": {**TOWERS["image"], "patch_dropout": patch_dropout}}
  return Towers(towers=towers, out_dim=8, temperature_init=10.0, bias_init=-5.0)


def _batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, 8, 8, 3)).astype(np.float32),
          "text": rng.integers(1, 32, (n, 6)).astype(np.int32)}


MESH = sharding.make_mesh(dict(data=-1), jax.devices()[:1])


@pytest.fixture(autouse=True)
def _one_device_mesh():
  with jax.set_mesh(MESH), nn.logical_axis_rules(sharding.rules(())):
    yield


def _ctx(total_steps=None):
  return Context(mesh=MESH, batch_size=8, text_len=6, image_size=(8, 8),
                 total_steps=total_steps)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_without_parts_it_is_the_contrastive_objective(loss):
  ours = siglip2.Siglip2(_model(), _ctx(100), loss=loss)
  theirs = contrastive.Contrastive(_model(), _ctx(100), loss=loss)
  params = nn.unbox(ours.init_params(jax.random.key(0)))
  want_params = nn.unbox(theirs.init_params(jax.random.key(0)))
  assert jax.tree.structure(params) == jax.tree.structure(want_params)
  batch = _batch()
  (got, _), grads = jax.jit(ours.value_and_grad)(params, batch, jax.random.key(1),
                                                  step=np.int32(3))
  (want, _), want_grads = jax.jit(theirs.value_and_grad)(params, batch, jax.random.key(1))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), grads,
               want_grads)


def test_unmasked_tuning_turns_patch_dropout_off_at_its_step():
  obj = siglip2.Siglip2(_model(patch_dropout=0.5), _ctx(total_steps=10),
                        unmasked_tuning_fraction=0.2)
  assert obj.unmasked_from == 8
  params = nn.unbox(obj.init_params(jax.random.key(0)))
  batch = _batch()
  loss_fn = jax.jit(obj.loss_fn)
  no_dropout = siglip2.Siglip2(_model(), _ctx(10))
  want, _ = jax.jit(no_dropout.loss_fn)(params, batch, jax.random.key(1), step=np.int32(8))
  for step, dropped in ((0, True), (7, True), (8, False), (9, False)):
    got, metrics = loss_fn(params, batch, jax.random.key(1), step=np.int32(step))
    assert metrics["patch_dropout_on"] == float(dropped)
    assert np.isclose(got, want, rtol=1e-6) != dropped, step
  with pytest.raises(config_lib.ConfigError, match="has no patch dropout"):
    siglip2.Siglip2(_model(), _ctx(10), unmasked_tuning_fraction=0.2)
  with pytest.raises(config_lib.ConfigError, match="GradCache"):
    siglip2.Siglip2(_model(), _ctx(10), micro_batches=2)


def test_siglip2_trains_with_patch_dropout_and_unmasked_tuning(tmp_path, data_dir):
  from big_mm import train
  from conftest import read_metrics, tiny_config
  config = tiny_config(data_dir, objective=dict(name="siglip2", unmasked_tuning_fraction=0.5),
                       total_steps=4)
  with config.unlocked():
    config.model.towers["image"]["patch_dropout"] = 0.5
    config.log_every_steps = 1
  train.train(config, str(tmp_path))
  rows = [r for r in read_metrics(str(tmp_path)) if "patch_dropout_on" in r]
  assert [r["patch_dropout_on"] for r in rows] == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("spec,parts", [
    ("configs/siglip2_b16.py", ["locca", "self_distill"]),
    ("configs/siglip2_b16.py:naflex=true", ["locca"]),
    ("configs/demo_siglip2.py", ["locca"]),
    ("configs/demo_siglip2.py:data=scenes,locca=false,sd=true", ["self_distill"]),
])
def test_recipe_configs_build_their_parts(spec, parts):
  """The paper-scale and demo configs (shapes only: no tokenizer, no data): the objective and
  its parts build, and the params include each part's scopes."""
  from big_mm import models
  from big_mm.objectives import base
  c = config_lib.load(spec)
  model = models.get_model(c.model_name, **c.model.to_dict())
  ctx = Context(mesh=MESH, batch_size=c.batch_size, text_len=c.input.text_len,
                image_size=base.image_size(c.input.pp_image),
                image_patches=base.naflex_patches(c.input.pp_image),
                box_text_len=c.input.get("box_text_len") or 0, total_steps=1000)
  settings = c.objective.to_dict()
  del settings["name"]
  obj = siglip2.Siglip2(model, ctx, **settings)
  assert [p.NAME for p in obj.parts] == parts
  params = jax.eval_shape(obj.init_params, jax.random.key(0))
  assert {"img", "txt", "t", "b"} <= set(params)
  if "locca" in parts:
    assert "dec" in params
