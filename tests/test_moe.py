"""Mixture-of-experts MLPs (big_mm/models/moe.py): routing against a loop reference, capacity
under an overloaded expert, expert-parallel train steps equal one device, sparse upcycling of
the dense demo."""
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_mm import config as config_lib
from big_mm import sharding, train
from big_mm.input import pipeline
from big_mm.models import aux_loss, moe
from conftest import ROOT, final_params, tiny_config, train_steps


def loop_token_choice(probs, top_k, cap, batch_priority, renormalize, causal):
  """Token-choice routing, one assignment at a time: -> combine [G, S, E, C], dropped count."""
  g, n, e = probs.shape
  combine = np.zeros((g, n, e, cap))
  dropped = 0
  for gi in range(g):
    order = (sorted(range(n), key=lambda t: -probs[gi, t].max()) if batch_priority
             else range(n))
    choices = {t: np.argsort(-probs[gi, t], kind="stable")[:top_k] for t in range(n)}
    fill = [0] * e
    ranked = ([(t, k) for t in order for k in range(top_k)] if causal else
              [(t, k) for k in range(top_k) for t in order])
    for t, k in ranked:
      ex = choices[t][k]
      gate = probs[gi, t, ex] / (probs[gi, t, choices[t]].sum() if renormalize else 1.0)
      if fill[ex] < cap:
        combine[gi, t, ex, fill[ex]] = gate
        fill[ex] += 1
      else:
        dropped += 1
  return combine, dropped


@pytest.mark.parametrize("top_k,batch_priority,renormalize,causal", [
    (1, False, False, False), (2, True, True, False), (2, False, False, True)])
def test_token_choice_matches_loop_reference(top_k, batch_priority, renormalize, causal):
  probs = np.asarray(jax.nn.softmax(jax.random.normal(jax.random.key(0), (3, 10, 4)) * 2))
  s = moe.MoeSettings(num_experts=4, top_k=top_k, capacity_factor=0.8,
                      batch_priority=batch_priority, renormalize=renormalize, causal=causal)
  cap = moe.capacity(s, 10)
  assert cap == math.ceil(top_k * 10 / 4 * 0.8)
  combine, dispatch, dropped, load = moe.token_choice(jnp.asarray(probs), s, cap)
  want, n_dropped = loop_token_choice(probs, top_k, cap, batch_priority, renormalize, causal)
  assert n_dropped > 0  # the capacity binds
  np.testing.assert_allclose(combine, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(dispatch, want > 0)
  np.testing.assert_allclose(dropped, n_dropped / (3 * 10 * top_k), rtol=1e-6)
  np.testing.assert_allclose(np.sum(load), 1.0, rtol=1e-6)


def _moe_layer(**settings):
  s = moe.MoeSettings(**{"num_experts": 4, "load_balance_weight": 0.0, "z_loss_weight": 0.0,
                         **settings})
  layer = moe.MoeMlp(settings=s, mlp_dim=16)
  x = jax.random.normal(jax.random.key(1), (2, 12, 8))
  return layer, x, nn.meta.unbox(layer.init(jax.random.key(2), x)["params"])


def test_overloaded_expert_takes_its_capacity_and_drops_the_rest():
  """A router that sends every token to expert 0: it takes C tokens per group in sequence
  order; the others pass through the residual only (zero MLP output), counted as dropped."""
  layer, x, params = _moe_layer(top_k=1, capacity_factor=1.0)
  x = x.at[..., 0].set(jnp.abs(x[..., 0]) + 1.0)
  router = np.zeros((8, 4), np.float32)
  router[0, 0] = 50.0  # logit of expert 0 >= 50, the others 0
  params = {**params, "router": jnp.asarray(router)}
  probs = jax.nn.softmax(x @ router)
  assert bool(jnp.all(jnp.argmax(probs, -1) == 0))
  y, state = layer.apply({"params": params}, x, mutable=[moe.layers.AUX_METRIC])
  cap = moe.capacity(layer.settings, 12)
  assert cap == 3
  stats = aux_loss.collect_metrics(state[moe.layers.AUX_METRIC])
  np.testing.assert_allclose(stats["moe_dropped"], 1 - cap / 12, rtol=1e-6)
  np.testing.assert_allclose(stats["moe_load/expert_0"], 1.0)
  # Expert 0's MLP, by hand, on the first C tokens of each example.
  e0 = jax.tree.map(lambda p: p[0], {k: params[k] for k in ("Dense_0", "Dense_1")})
  h = nn.gelu(x @ e0["Dense_0"]["kernel"] + e0["Dense_0"]["bias"], approximate=True)
  want = (h @ e0["Dense_1"]["kernel"] + e0["Dense_1"]["bias"]) * probs[..., :1]
  np.testing.assert_allclose(y[:, :cap], want[:, :cap], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(y[:, cap:], 0.0)


def test_expert_choice_fills_every_expert():
  layer, x, params = _moe_layer(routing="expert_choice", capacity_factor=1.0)
  probs = jax.nn.softmax(x.reshape(2, 12, 8) @ params["router"])
  s = layer.settings
  cap = moe.capacity(s, 12)
  combine, dispatch, dropped, _ = moe.expert_choice(probs, s, cap)
  np.testing.assert_array_equal(jnp.sum(dispatch, axis=(1, 3)), cap)  # C tokens per expert
  top = jnp.sort(jnp.swapaxes(probs, 1, 2), axis=-1)[..., ::-1][..., :cap]  # [G, E, C]
  np.testing.assert_allclose(jnp.sort(jnp.sum(combine, axis=1), -1)[..., ::-1], top, rtol=1e-6)
  taken = jnp.any(dispatch, axis=(2, 3))
  np.testing.assert_allclose(dropped, 1 - jnp.mean(taken), rtol=1e-6)


def test_settings_errors_name_the_fix():
  with pytest.raises(ValueError, match="unknown keys.*experts"):
    moe.settings({"experts": 4}, 2)
  with pytest.raises(ValueError, match="neither causal"):
    moe.settings({"routing": "expert_choice"}, 2, causal=True)
  with pytest.raises(ValueError, match="every_N"):
    moe.settings({"layers": "odd"}, 2)
  assert moe.layer_indices("every_2", 6) == (1, 3, 5)
  assert moe.layer_indices("last_2", 6) == (4, 5)
  from big_mm.models.vit import ViT
  vit = ViT(width=8, depth=2, num_heads=2, patch_size=4, scan=True, moe={"layers": "every_2"})
  with pytest.raises(ValueError, match="scan=True needs every block alike"):
    vit.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


def test_moe_decoder_stays_causal_and_decodes_like_the_full_pass():
  """A captioner whose decoder blocks are top-2 MoE: with dropped tokens, logits at position i
  still ignore the tokens after i; without drops, KV-cache decoding (one token per group)
  gives the full pass's logits."""
  from test_generative import DEC, IMG, TEXTS, _context
  from big_mm.models import get_model
  from big_mm.objectives import get_objective
  images = jax.random.normal(jax.random.key(1), (len(TEXTS), 32, 32, 3))
  texts = jnp.asarray(TEXTS)
  for capacity in (0.5, 4.0):
    decoder = dict(DEC, depth=1, moe=dict(layers="all", num_experts=4, top_k=2,
                                         capacity_factor=capacity))
    model = get_model("captioner", image=IMG, decoder=decoder)
    obj = get_objective("captioning")(model, _context())
    params = sharding.unbox(model.init({"params": jax.random.key(0)}, images[:1], texts[:1],
                                       train=False)["params"])
    logits = jax.jit(obj._logits)
    full = logits(params, images, texts)
    if capacity < 1:
      _, stats = aux_loss.apply(model, params, images, texts, train=False)
      assert float(stats["dec/moe_dropped"]) > 0, stats
      changed = logits(params, images, texts.at[:, 4:].set(77))
      np.testing.assert_allclose(full[:, :5], changed[:, :5], atol=1e-5)
      assert np.max(np.abs(full[:, 5:] - changed[:, 5:])) > 1e-3
      continue
    enc = obj.encode(params, images)
    cache = obj.init_cache(params, enc, texts.shape[1])
    inputs = jnp.pad(texts, ((0, 0), (1, 0)))[:, :-1]
    step = jax.jit(obj.decode_step)
    for pos in range(texts.shape[1]):
      out, cache = step(params, enc, cache, inputs[:, pos], jnp.int32(pos))
      np.testing.assert_allclose(out, full[:, pos], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("image_top_k,text_top_k", [(1, 2), (2, 1)])
def test_expert_parallel_steps_match_one_device(data_dir, image_top_k, text_top_k):
  """Experts over an expert axis of 4 (batch over data 2 x expert 4) train exactly like one
  device: top-1 and top-2, with dropped tokens (image, capacity 0.5) and without (text)."""
  config = tiny_config(data_dir)
  it = pipeline.make_train_iterator(config.input, global_batch_size=16, seed=0, sharding=None)
  batches = [{k: v for k, v in next(it).items() if k in ("image", "text")} for _ in range(3)]
  towers = {"model.towers.image.moe": dict(layers="all", num_experts=4, top_k=image_top_k,
                                           capacity_factor=0.5, router_noise=0.1),
            "model.towers.text.moe": dict(layers="all", num_experts=4, top_k=text_top_k,
                                          capacity_factor=4.0, renormalize=True)}
  _, ref, ref_params, _ = train_steps(tiny_config(data_dir, mesh=dict(data=1, expert=1),
                                                 **towers), jax.devices()[:1], batches)
  _, got, params, shardings = train_steps(tiny_config(data_dir, mesh=dict(data=2, expert=4),
                                                     **towers), jax.devices(), batches)
  for r, g in zip(ref, got):
    for key in ("loss", "img/moe_dropped", "txt/moe_dropped", "aux_loss/load_balance",
                "aux_loss/router_z", "img/moe_load/expert_3"):
      np.testing.assert_allclose(g[key], r[key], rtol=2e-5, err_msg=key)
  assert all(m["img/moe_dropped"] > 0 for m in got) and all(m["txt/moe_dropped"] == 0
                                                             for m in got)
  assert got[-1]["loss"] != got[0]["loss"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               params, ref_params)
  experts = shardings["img"]["Transformer"]["encoderblock_0"]["MoeMlp_0"]["Dense_0"]["kernel"]
  assert experts.spec[0] == "expert"


def test_upcycled_demo_starts_as_the_dense_demo(trained_demo, data_dir):
  """init.workdir = the trained dense demo: every expert starts as its MLP, the router fresh;
  with top-2 weights renormalised to 1 and no drops, the MoE model embeds exactly as the dense
  one."""
  workdir, _ = trained_demo
  user = config_lib.load_file(os.path.join(ROOT, "configs", "demo_moe.py") + ":top_k=2,capacity=8")
  user.input.data_dir = data_dir
  user.init = dict(workdir=str(workdir))
  user.evals = {}
  config = config_lib.load(user)
  setup = train.build(config, devices=jax.devices()[:1])
  ts = train.make_train_state(setup)
  with train.use_mesh(setup):
    state = train.load_init(config, ts, ts.init(jax.random.key(0)))
  dense, step = train.read_params(workdir=str(workdir))
  block = state["params"]["img"]["Transformer"]["encoderblock_1"]["MoeMlp_0"]
  np.testing.assert_array_equal(block["Dense_0"]["kernel"][3],
                                dense["img/Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel"])
  dense_config = config_lib.load_file(os.path.join(ROOT, "configs", "demo.py"))
  dense_model = train.build(config_lib.load(dense_config), devices=jax.devices()[:1]).model
  it = pipeline.make_train_iterator(config.input, global_batch_size=8, seed=0, sharding=None)
  batch = next(it)
  inputs = {"image": batch["image"], "text": batch["text"]}
  # Jitted: run eagerly, the demo-size models compiled each op on its own (3x the time).
  (z_moe, _), stats = jax.jit(lambda p, x: aux_loss.apply(setup.model, p, x, train=False))(
      state["params"], inputs)
  z_dense, _ = jax.jit(dense_model.apply)({"params": final_params(str(workdir), step)}, inputs)
  for m in ("image", "text"):
    np.testing.assert_allclose(z_moe[m], z_dense[m], rtol=1e-4, atol=1e-5)
  assert float(stats["img/moe_dropped"]) == 0.0


def test_routing_keeps_the_batch_sharded():
  """With the batch over 8 devices, routing (top-k, capacity, dispatch) needs no collective:
  each device routes its own groups (lax.top_k would all-gather the router outputs)."""
  from flax import linen
  mesh = sharding.make_mesh(dict(data=8, fsdp=1, tensor=1, expert=1))
  x = jax.device_put(jnp.ones((16, 8, 16)), sharding.batch_sharding(mesh))
  for routing, k in (("token_choice", 2), ("expert_choice", 1)):
    layer = moe.MoeMlp(settings=moe.MoeSettings(num_experts=4, top_k=k, routing=routing),
                       mlp_dim=32)
    with jax.set_mesh(mesh), linen.logical_axis_rules(sharding.DEFAULT_RULES):
      params = nn.meta.unbox(jax.jit(layer.init)(jax.random.key(0), x))
      hlo = jax.jit(layer.apply).lower(params, x).compile().as_text()
    assert not any(op in hlo for op in ("all-gather", "all-to-all", "all-reduce")), routing
