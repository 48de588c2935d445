"""MultiMAE objective (big_mm/objectives/masked.py) and model (big_mm/models/multimae.py)."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from big_mm import config as config_lib
from big_mm import objectives, sharding
from big_mm.input.tokenizer import Tokenizer
from big_mm.models import multimae as multimae_lib
from big_mm.objectives import masked

MODALITIES = ("rgb", "depth", "semseg")
TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "digits_spm.model")
VOCAB = 128  # data/digits_spm.model


def _objective(modalities=MODALITIES, num_visible=24, objective=(), **model_kw):
  kw = dict(modalities=modalities, image_size=16, patch_size=4,
            encoder=dict(width=32, depth=1, num_heads=2),
            decoder=dict(width=16, depth=1, num_heads=2), num_semseg_classes=4,
            vocab_size=VOCAB, text_len=6, depth_mean=5.0, depth_std=2.0)
  kw.update(model_kw)
  model = multimae_lib.MultiMAE(**kw)
  ctx = objectives.Context(modalities=tuple(modalities), text_len=kw["text_len"],
                           tokenizer=Tokenizer(TOKENIZER))
  return masked.MultiMAE(model, ctx, num_visible=num_visible, **dict(objective))


def _batch(b=4, seed=0, text=False):
  rng = np.random.default_rng(seed)
  batch = {"image": jnp.asarray(rng.uniform(-1, 1, (b, 16, 16, 3)), jnp.float32),
           "depth": jnp.asarray(rng.uniform(1, 9, (b, 16, 16)), jnp.float32),
           "semseg": jnp.asarray(rng.integers(0, 4, (b, 16, 16)), jnp.int32)}
  if text:
    tokens = rng.integers(2, VOCAB, (b, 6))
    tokens[:, 4:] = 0  # two pad tokens
    batch["text"] = jnp.asarray(tokens, jnp.int32)
  return batch


def _params(obj):
  return sharding.unbox(obj.init_params(jax.random.key(0)))


def _concat_available(available):
  return np.concatenate([np.asarray(a) for a in available.values()], axis=1)


@pytest.mark.parametrize("alpha", [0.2, 1.0, 5.0])
def test_sample_visible_exact_budget_and_dirichlet_split(alpha):
  b, counts, budget = 256, (16, 16, 16), 12
  available = {m: jnp.ones((b, n), bool) for m, n in zip(MODALITIES, counts)}
  present = jnp.ones((b, 3), bool)
  fractions = masked.dirichlet_fractions(jax.random.key(1), present, alpha)
  visible, valid = masked.sample_visible(jax.random.key(2), available, fractions, budget)
  visible = np.asarray(visible)
  assert visible.shape == (b, budget) and np.all(valid)
  for row in visible:  # distinct tokens
    assert len(set(row.tolist())) == budget
  per_modality = np.stack([np.sum((visible >= 16 * i) & (visible < 16 * (i + 1)), axis=1)
                           for i in range(3)], axis=1)
  np.testing.assert_array_equal(per_modality.sum(1), budget)
  # Apportionment: each modality's count is within one of budget * its Dirichlet fraction.
  assert np.all(np.abs(per_modality - budget * np.asarray(fractions)) <= 1.0 + 1e-6)
  # Symmetric Dirichlet: mean fraction 1/3; smaller alpha -> more spread between modalities.
  np.testing.assert_allclose(per_modality.mean(0) / budget, 1 / 3, atol=0.06)


def test_sample_visible_respects_absent_modalities_and_short_ones():
  b, budget = 64, 20
  avail_depth = np.ones((b, 16), bool)
  avail_depth[: b // 2] = False  # depth absent from the first half of the batch
  available = {"rgb": jnp.ones((b, 16), bool), "depth": jnp.asarray(avail_depth),
               "semseg": jnp.zeros((b, 16), bool)}  # semseg absent everywhere
  present = jnp.stack([jnp.any(a, axis=1) for a in available.values()], axis=1)
  fractions = masked.dirichlet_fractions(jax.random.key(3), present, 1.0)
  assert np.all(np.asarray(fractions)[:, 2] == 0)
  assert np.all(np.asarray(fractions)[: b // 2, 1] == 0)
  visible, valid = masked.sample_visible(jax.random.key(4), available, fractions, budget)
  visible, valid = np.asarray(visible), np.asarray(valid)
  flat = _concat_available(available)
  # Rows with depth have 32 tokens for a budget of 20: all picks real and available. Rows
  # without it have only rgb's 16: those are all picked and the 4 other picks are invalid.
  assert np.all(valid[b // 2:]) and np.all(valid[:b // 2].sum(1) == 16)
  assert np.all(np.take_along_axis(flat, visible, axis=1)[valid])
  fractions_rgb = jnp.zeros((b, 3)).at[:, 0].set(1.0)
  only_rgb = {"rgb": jnp.ones((b, 16), bool), "depth": jnp.zeros((b, 16), bool),
              "semseg": jnp.zeros((b, 16), bool)}
  visible, valid = masked.sample_visible(jax.random.key(5), only_rgb, fractions_rgb, budget)
  np.testing.assert_array_equal(np.sum(np.asarray(valid), axis=1), 16)
  picked = np.where(np.asarray(valid), np.asarray(visible), -1)
  for row in picked:
    assert sorted(row[row >= 0].tolist()) == list(range(16))


def test_masked_tokens_never_reach_the_encoder():
  obj = _objective()
  batch = _batch()
  params = _params(obj)
  visible, valid, _ = obj.masks(jax.random.key(7), batch)

  def encoded(b):
    return obj._apply(params, obj.inputs(b), visible, valid, method=obj.model.encode)[0]

  ref = encoded(batch)
  # Change every input value of every token that was not picked: the encoder output is
  # bit-identical.
  p = obj.model.patch_size
  seen = np.zeros((4, 48), bool)
  for i in range(4):
    seen[i, np.asarray(visible[i])[np.asarray(valid[i])]] = True
  changed = {}
  for j, (m, key) in enumerate((("rgb", "image"), ("depth", "depth"), ("semseg", "semseg"))):
    x = np.asarray(batch[key]).copy()
    for i in range(4):
      for t in np.flatnonzero(~seen[i, 16 * j:16 * (j + 1)]):
        r, c = divmod(int(t), 4)
        region = x[i, r * p:(r + 1) * p, c * p:(c + 1) * p]
        x[i, r * p:(r + 1) * p, c * p:(c + 1) * p] = (3 - region) if key == "semseg" else (
            region * -7.0 + 2.0)
    changed[key] = jnp.asarray(x)
  np.testing.assert_array_equal(encoded(changed), ref)
  assert encoded(_batch(seed=1)).shape == ref.shape  # and the inputs do matter:
  assert not np.allclose(encoded(_batch(seed=1)), ref)
  # The encoder sees the global token + exactly num_visible tokens.
  assert ref.shape[1] == obj.model.num_global_tokens + obj.budget


def test_loss_only_on_masked_targets():
  obj = _objective()
  batch = _batch()
  params = _params(obj)
  rng = jax.random.key(11)
  loss = jax.jit(obj.loss_fn)
  ref, metrics = loss(params, batch, rng)
  assert set(metrics) >= {"rgb/loss", "depth/loss", "semseg/loss"}
  mask_rng, _ = jax.random.split(rng)
  visible, valid, _ = obj.masks(mask_rng, batch)
  seen = np.zeros((4, 48), bool)
  for i in range(4):
    seen[i, np.asarray(visible[i])[np.asarray(valid[i])]] = True
  # Each modality's loss is the mean of its per-token losses over the tokens NOT given to the
  # encoder (visible tokens have weight 0).
  preds, _ = obj._apply(params, obj.inputs(batch), visible, valid)
  per_token = obj.token_losses(preds, obj.targets(batch))
  for j, m in enumerate(MODALITIES):
    values, weights = per_token[m]
    masked_w = np.asarray(weights) * ~seen[:, 16 * j:16 * (j + 1)]
    expected = np.sum(np.asarray(values) * masked_w) / max(masked_w.sum(), 1)
    np.testing.assert_allclose(metrics[f"{m}/loss"], expected, rtol=1e-5)
  np.testing.assert_allclose(ref, sum(metrics[f"{m}/loss"] for m in MODALITIES), rtol=1e-5)


def test_modality_absent_for_some_examples_gets_no_tokens_and_no_loss():
  obj = _objective()
  batch = dict(_batch(), depth_present=jnp.asarray([1, 0, 1, 0], jnp.int32))
  params = _params(obj)
  visible, valid, available = obj.masks(jax.random.key(2), batch)
  for i in (1, 3):
    v = np.asarray(visible[i])[np.asarray(valid[i])]
    assert not np.any((v >= 16) & (v < 32))
  # Depth's loss only comes from examples 0 and 2: garbage depth in 1 and 3 changes nothing.
  garbage = dict(batch, depth=batch["depth"].at[jnp.asarray([1, 3])].set(-50.0))
  a = obj.loss_fn(params, batch, jax.random.key(2))[1]["depth/loss"]
  b = obj.loss_fn(params, garbage, jax.random.key(2))[1]["depth/loss"]
  np.testing.assert_allclose(a, b, rtol=1e-6)
  # A modality missing from the batch entirely: no loss key, no tokens.
  no_depth = {k: v for k, v in batch.items() if not k.startswith("depth")}
  _, metrics = obj.loss_fn(params, no_depth, jax.random.key(2))
  assert "depth/loss" not in metrics and float(metrics["depth/visible_fraction"]) == 0.0


def test_text_modality_pads_are_never_tokens_or_targets():
  obj = _objective(("rgb", "text"), num_visible=10)
  batch = _batch(text=True)
  batch = {"image": batch["image"], "text": batch["text"]}
  params = _params(obj)
  visible, valid, available = obj.masks(jax.random.key(0), batch)
  np.testing.assert_array_equal(np.asarray(available["text"]), np.asarray(batch["text"]) != 0)
  v = np.asarray(visible)
  text_picks = v[(v >= 16)] - 16
  assert np.all(text_picks < 4)
  loss, metrics = obj.loss_fn(params, batch, jax.random.key(0))
  assert np.isfinite(loss) and "text/loss" in metrics


def test_predict_and_embed_shapes_and_input_independence():
  obj = _objective()
  batch = _batch()
  params = _params(obj)
  out = obj.predict(params, batch, inputs=("rgb",), targets=("depth", "semseg"))
  assert out["depth"].shape == (4, 16, 16) and out["semseg"].shape == (4, 16, 16, 4)
  # Targets are fully masked: their values in the batch do not matter.
  other = dict(batch, depth=batch["depth"] * 3, semseg=3 - batch["semseg"])
  out2 = obj.predict(params, other, inputs=("rgb",), targets=("depth", "semseg"))
  np.testing.assert_array_equal(out["depth"], out2["depth"])
  rgb = obj.predict(params, batch, inputs=("depth", "semseg"), targets=("rgb",))["rgb"]
  assert rgb.shape == (4, 16, 16, 3)
  feats = obj.embed_images(params, batch["image"])
  assert feats.shape == (4, 32)
  with pytest.raises(ValueError, match="not one of the model"):
    obj.predict(params, batch, inputs=("rgb",), targets=("text",))


def test_patchify_round_trip():
  x = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
  patches = multimae_lib.patchify(x, 4)
  assert patches.shape == (2, 6, 48)
  np.testing.assert_array_equal(patches[0, 1], x[0, :4, 4:8].reshape(-1))
  np.testing.assert_array_equal(multimae_lib.unpatchify(patches, 4, 8, 12), x)


def test_config_errors():
  with pytest.raises(config_lib.ConfigError, match=r"num_visible=999 must be in \[1, 48\]"):
    _objective(num_visible=999)
  with pytest.raises(ValueError, match="distinct names"):
    multimae_lib.MultiMAE(modalities=("rgb", "lidar"))
  with pytest.raises(TypeError, match="Invalid model.encoder option"):
    multimae_lib.MultiMAE(encoder=dict(widht=3))


@pytest.mark.parametrize("key,value", [
    ("micro_batches", 2), ("implementation", "pallas"), ("strategy", "ring"),
    ("loss", "softmax"), ("label_smoothing", 0.1), ("parallel_fraction", 0.5)])
def test_other_objectives_settings_are_unknown_keys(key, value):
  """The contrastive / generative settings do nothing here, so they are unknown keys."""
  match = rf"Unknown config key 'objective.{key}' for objective.name='multimae'"
  with pytest.raises(config_lib.ConfigError, match=match):
    _objective(objective={key: value})
  with pytest.raises(config_lib.ConfigError, match=match):
    objectives.settings({"name": "multimae", key: value})
  _objective(objective={"modality_weights": (("depth", 2.0),)})


@pytest.mark.parametrize("settings,match", [
    (dict(dirichlet_alpha=0.0), r"dirichlet_alpha must be > 0"),
    (dict(num_visible=0), r"num_visible must be a positive integer"),
    (dict(modality_weights=("depth", 2.0)), r"modality_weights must be \(\(modality, weight\)"),
])
def test_bad_settings_fail_when_the_config_loads(settings, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    objectives.settings(dict(name="multimae", **settings))


def test_sharded_loss_and_grad_equal_single_device():
  obj = _objective()
  batch = _batch(b=8)
  params = _params(obj)
  rng = jax.random.key(3)
  grad_fn = jax.jit(jax.value_and_grad(obj.loss_fn, has_aux=True))
  (ref_loss, _), ref_grads = grad_fn(params, batch, rng)
  mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(None, mesh)):
    boxed = jax.eval_shape(lambda: obj.init_params(jax.random.key(0)))
    param_sh = sharding.logical_shardings(boxed, mesh)
    assert any(s.spec != P() for s in jax.tree.leaves(param_sh))  # FSDP really shards
    sharded_params = jax.device_put(params, param_sh)
    sharded_batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    (loss, _), grads = grad_fn(sharded_params, sharded_batch, rng)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), grads,
               ref_grads)


def test_demo_recipe_trains_and_evaluates_end_to_end(scenes_dir, tmp_path):
  """configs/demo_multimae.py shrunk, through the trainer on one device (the sharded step is
  checked above; 8 simulated devices made this the slowest test in CI): the scenes pipeline,
  the loss, a checkpoint and both evaluators (cross_modal with its baselines, fewshot); 400
  steps of training predict held-out depth from RGB clearly better than the training mean."""
  from big_mm import train
  user = config_lib.load_file(os.path.join(os.path.dirname(TOKENIZER), "..", "configs",
                                           "demo_multimae.py"))
  steps = 400
  user.batch_size, user.total_steps, user.log_every_steps = 32, steps, 100
  user.input.data_dir = scenes_dir
  user.model.encoder.update(width=64, depth=1, mlp_dim=128, num_heads=2)
  user.model.decoder.update(width=16, mlp_dim=32, num_heads=2)
  # 64 visible tokens (a whole modality) and a peaked Dirichlet(0.2) often give one modality
  # all of them: the evaluator's setting (RGB fully visible, depth fully masked). With the
  # demo's Dirichlet(1) and 32 visible tokens, 300 steps of batch 16 still predicted depth
  # from RGB worse than the mean (abs-rel 0.71 vs 0.26).
  user.objective.update(num_visible=64, dirichlet_alpha=0.2)
  user.optim.update(lr=3e-3)
  user.optim.schedule.warmup_steps = 10
  user.evals.cross_modal.update(split="test[:48]", baseline_examples=256, every_steps=steps)
  user.evals.fewshot.update(split="test[:24]", train_split="train[:48]", shots=(2,),
                            every_steps=steps)
  user.checkpoint = dict(every_steps=steps, keep=1)
  config = config_lib.load(user)
  results = train.train(config, str(tmp_path), devices=jax.devices()[:1])
  for key in ("depth_from_rgb/abs_rel", "depth_from_rgb/abs_rel_mean_baseline",
              "semseg_from_rgb/miou", "semseg_from_rgb/miou_mean_baseline",
              "rgb_from_depth_semseg/psnr"):
    value = results[f"eval/cross_modal/{key}"]
    assert np.isfinite(value), key
  # Measured 0.189 vs the baseline's 0.264 (0.72x) with seeds 0 and 1; after 2 steps ~4x.
  depth = results["eval/cross_modal/depth_from_rgb/abs_rel"]
  baseline = results["eval/cross_modal/depth_from_rgb/abs_rel_mean_baseline"]
  assert depth < 0.85 * baseline, (depth, baseline)
  assert 0.0 <= results["eval/fewshot/2shot_accuracy"] <= 1.0
  assert results["eval/cross_modal/depth_from_rgb/num_examples"] == 48
  assert os.path.isdir(os.path.join(tmp_path, "checkpoints", str(steps)))
