"""LIMoE (big_mm/models/limoe.py): one MoE encoder shared by image and text, per-modality
entropy terms and statistics, trained by the contrastive objective."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_mm.input import pipeline
from big_mm.models import aux_loss, get_model, limoe, moe
from conftest import tiny_config, train_steps

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=2)
TOWERS = {"image": {"patch_size": 8, "pool": "map"}, "text": {"vocab_size": 50}}


def _model(**moe_kwargs):
  return get_model("limoe", towers=TOWERS, out_dim=16, **TINY,
                   moe=dict(layers="every_2", num_experts=4, **moe_kwargs))


def _inputs(b=4):
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 50, (b, 6)).astype(np.int32)
  tokens[:, 4:] = 0  # pads after the last token
  return {"image": jnp.asarray(rng.normal(size=(b, 16, 16, 3)), jnp.float32),
          "text": jnp.asarray(tokens)}


def test_forward_shapes_and_one_shared_encoder():
  model, inputs = _model(), _inputs()
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), inputs)["params"])
  assert sorted(params) == ["b", "img", "shared", "t", "txt"]
  assert "Transformer" not in params["img"] and "Transformer" not in params["txt"]
  assert params["shared"]["Transformer"]["encoderblock_1"]["MoeMlp_0"]["router"].shape == (32, 4)

  @jax.jit
  def run(p):
    apply = lambda p, x: model.apply({"params": p}, x)[0]
    # Each modality alone: only its embedding; the gradient of its first feature.
    alone = {m: apply(p, {m: inputs[m]}) for m in inputs}
    grads = {m: jax.grad(lambda p: jnp.sum(apply(p, {m: inputs[m]})[m][:, 0]))(p)
             for m in inputs}
    return model.apply({"params": p}, inputs), alone, grads

  (z, out), alone, grads = run(params)
  for m in ("image", "text"):
    assert z[m].shape == (4, 16) and sorted(alone[m]) == [m]
    np.testing.assert_allclose(jnp.linalg.norm(z[m], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(alone[m][m], z[m], rtol=1e-5, atol=1e-6)
  assert out["img/stem"].shape == (4, 2, 2, 32) and out["txt/encoded"].shape == (4, 6, 32)
  # Both modalities train the one encoder; neither touches the other's stem.
  for g in grads.values():
    assert all(np.any(x) for x in jax.tree.leaves(
        g["shared"]["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]))
  assert not any(np.any(x) for x in jax.tree.leaves(grads["image"]["txt"]))
  assert not any(np.any(x) for x in jax.tree.leaves(grads["text"]["img"]))


def _entropy(p):
  return -np.sum(p * np.log(p), axis=-1)


def test_entropy_losses_match_numpy():
  """Each modality's terms from its own tokens' router distributions (every MoE layer):
  local w * mean_i H(p_i), global w * max(0, tau - H(mean_i p_i)) (w * -H without tau)."""
  inputs = _inputs()
  params = None
  for threshold in (None, np.log(4.0)):
    model = _model(entropy_local_weight=0.3, entropy_global_weight=0.7,
                   entropy_global_threshold=threshold, load_balance_weight=0.0,
                   z_loss_weight=0.0)
    if params is None:
      params = nn.unbox(jax.jit(model.init)(jax.random.key(0), inputs)["params"])
    tags = []

    @jax.jit
    def run(p):
      logits = []

      def record(next_fun, args, kwargs, context):
        if isinstance(context.module, moe.MoeMlp) and context.method_name == "__call__":
          tags.append(context.module.settings.tag)
          logits.append(args[0] @ context.module.get_variable("params", "router"))
        return next_fun(*args, **kwargs)

      with nn.intercept_methods(record):
        _, aux = aux_loss.apply(model, p, inputs, train=True)
      return aux, logits

    aux, logits = run(params)
    assert sorted(tags) == ["image", "text"]
    for tag, l in zip(tags, logits):
      l = np.asarray(l, np.float64).reshape(-1, 4)
      p = np.exp(l - l.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      neg_h = -_entropy(p.mean(0))
      want_global = neg_h if threshold is None else max(0.0, threshold + neg_h)
      np.testing.assert_allclose(aux[f"aux_loss/entropy_local/{tag}"],
                                 0.3 * _entropy(p).mean(), rtol=1e-5)
      np.testing.assert_allclose(aux[f"aux_loss/entropy_global/{tag}"], 0.7 * want_global,
                                 rtol=1e-5, atol=1e-7)
    assert threshold is None or aux["aux_loss/entropy_global/text"] > 0
    assert "aux_loss/load_balance" not in aux and "img/moe_dropped" in aux


def test_contrastive_trains_limoe_expert_parallel_like_one_device(data_dir):
  """model_name="limoe" through train.build / make_train_step: experts over an expert axis of
  4 train exactly as on one device, with per-modality entropy terms and MoE statistics."""
  model = dict(towers={"image": {"patch_size": (8, 8), "pool": "map"},
                       "text": {"vocab_size": 128}},
               **{**TINY, "depth": 1}, out_dim=16, temperature_init=10.0, bias_init=-10.0,
               moe=dict(layers="all", num_experts=4, capacity_factor=1.0,
                        entropy_local_weight=0.01, entropy_global_weight=0.01,
                        entropy_global_threshold=1.0))
  it = pipeline.make_train_iterator(tiny_config(data_dir).input, global_batch_size=16, seed=0,
                                    sharding=None)
  batches = [{k: v for k, v in next(it).items() if k in ("image", "text")} for _ in range(2)]
  config = lambda mesh: tiny_config(data_dir, model_name="limoe", model=model, mesh=mesh)
  _, ref, ref_params, _ = train_steps(config(dict(data=1, expert=1)), jax.devices()[:1], batches)
  setup, got, params, shardings = train_steps(config(dict(data=2, expert=4)), jax.devices(),
                                              batches)
  keys = [f"aux_loss/entropy_{kind}/{m}" for kind in ("local", "global")
          for m in ("image", "text")]
  keys += ["loss", "img/moe_dropped", "txt/moe_dropped", "txt/moe_load/expert_3",
           "aux_loss/load_balance"]
  for r, g in zip(ref, got):
    for key in keys:
      np.testing.assert_allclose(g[key], r[key], rtol=2e-5, atol=1e-7, err_msg=key)
  assert got[-1]["loss"] != got[0]["loss"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               params, ref_params)
  experts = shardings["shared"]["Transformer"]["encoderblock_0"]["MoeMlp_0"]["Dense_0"]
  assert experts["kernel"].spec[0] == "expert"

  # The evaluators' predict fns.
  obj, batch = setup.objective, jax.tree.map(lambda x: x[:4], batches[0])
  z_img, z_txt, patches = jax.jit(lambda p: (
      obj.embed_images(p, batch["image"]), obj.embed_texts(p, batch["text"]),
      obj.patch_features(p, batch["image"])))(params)
  assert z_img.shape == z_txt.shape == (4, 16) and patches.shape[-1] == 32


@pytest.mark.parametrize("kwargs,match", [
    (dict(towers={"image": {"pool": "tok"}}), "pool"),
    (dict(towers={"text": {"vocab": 5}}), "unknown keys"),
    (dict(towers={"depth": {}}), "stems"),
    (dict(towers=TOWERS, moe=dict(entropy_local_weight=-1.0)), "must be >= 0"),
])
def test_bad_settings_fail_clearly(kwargs, match):
  with pytest.raises(ValueError, match=match):
    limoe.LIMoE(**TINY, **kwargs)
