"""VideoMAE V2 objective (big_mm/objectives/videomae.py) and model (big_mm/models/videomae.py)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from big_mm import config as config_lib
from big_mm import objectives, sharding, train
from big_mm.models import get_model
from big_mm.models import videomae as videomae_lib
from big_mm.objectives import videomae

SHAPE = (8, 16, 16, 3)  # 2x4x4 tubelets: grid (t, h, w) = (4, 4, 4), N = 64


def _objective(shape=SHAPE, **settings):
  model = videomae_lib.VideoMAE(
      encoder=dict(width=32, depth=1, num_heads=2, patch_size=4, tubelet_size=2),
      decoder=dict(width=16, depth=1, num_heads=2))
  ctx = objectives.Context(modalities=("video",), shapes={"video": shape})
  return videomae.VideoMAE(model, ctx, **settings)


def _video(b=4, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (b,) + SHAPE), jnp.float32)


@functools.lru_cache(maxsize=None)
def _default():
  """(objective, params, jitted value_and_grad of its loss): built and compiled once, shared."""
  obj = _objective()
  params = sharding.unbox(jax.jit(obj.init_params)(jax.random.key(0)))
  return obj, params, jax.jit(jax.value_and_grad(obj.loss_fn, has_aux=True))


def _batch(b=8, seed=0, present=None):
  present = np.ones(b) if present is None else np.asarray(present)
  return {"video": _video(b, seed), "video_present": jnp.asarray(present, jnp.int32)}


def _reference_running_cell(phase0, t, h, w, num_masked):
  """The repo's Cell queue (OpenGVLab/VideoMAEv2 dataset/masking_generator.py), re-derived:
  queue [1]*m + [0]*(4-m) (1 = masked), read rolled by the pointer, which advances before each
  time slice; the 2x2 cell tiles the grid. -> keep bool [t, h, w]."""
  queue = np.array([1] * num_masked + [0] * (4 - num_masked))
  ptr, out = phase0, []
  for _ in range(t):
    ptr += 1
    cell = queue[(np.arange(4) + ptr) % 4].reshape(2, 2)
    out.append(np.tile(cell, (h // 2, w // 2)) == 0)
  return np.stack(out)


@pytest.mark.parametrize("mask_ratio", [0.75, 0.9])
def test_tube_masks_exact_ratio_shared_over_time(mask_ratio):
  obj = _objective(mask_ratio=mask_ratio, decoder_mask_ratio=0.0)
  b, (t, h, w) = 32, obj.grid
  visible, targets = map(np.asarray, obj.masks(jax.random.key(1), b))
  num_masked = int(np.floor(mask_ratio * h * w))
  assert visible.shape == (b, t * (h * w - num_masked))
  assert targets.shape == (b, t * num_masked)  # V1: every masked token is a target
  seen = np.zeros((b, t * h * w), bool)
  np.put_along_axis(seen, visible, True, axis=1)
  assert (seen.sum(1) == visible.shape[1]).all()  # distinct
  per_slice = seen.reshape(b, t, h * w)
  assert (per_slice == per_slice[:, :1]).all()  # one spatial mask for every time slice
  assert (per_slice[:, 0].sum(1) == h * w - num_masked).all()
  assert len({row.tobytes() for row in per_slice[:, 0]}) > 1  # random per example
  for v, g in zip(visible, targets):  # the targets are the masked tokens, all of them
    np.testing.assert_array_equal(g, np.setdiff1d(np.arange(t * h * w), v))


@pytest.mark.parametrize("ratio,num_masked", [(0.5, 2), (0.25, 1), (0.75, 3)])
def test_running_cell_follows_the_paper_and_picks_only_encoder_masked(ratio, num_masked):
  obj = _objective(decoder_mask_ratio=ratio)
  t, h, w = obj.grid
  for phase in range(4):
    keep = np.asarray(videomae.running_cell_keep(jnp.array([phase]), obj.grid, num_masked))
    keep = keep.reshape(t, h, w)
    # The same pattern as the repo's generator started one step earlier.
    np.testing.assert_array_equal(keep, _reference_running_cell(phase - 1, t, h, w, num_masked))
    cells = keep.reshape(t, h // 2, 2, w // 2, 2).sum(axis=(2, 4))
    assert (cells == 4 - num_masked).all()  # the ratio in every cell of every slice
    assert (keep.sum(0) == t * (4 - num_masked) // 4).all()  # each position runs equally
    assert not (keep[1:] == keep[:-1]).all()  # the cell runs
  b = 16
  visible, targets = map(np.asarray, obj.masks(jax.random.key(2), b))
  n_masked = t * int(np.floor(0.9 * h * w))
  assert targets.shape == (b, n_masked * (4 - num_masked) // 4)
  for v, g in zip(visible, targets):
    assert len(set(g)) == len(g) and not np.intersect1d(v, g).size  # encoder-masked only
  # Targets are exactly the encoder-masked tokens that some phase of the running cell keeps.
  _, cell_rng = jax.random.split(jax.random.key(2))
  phases = np.asarray(jax.random.randint(cell_rng, (b,), 0, 4))
  keep = np.asarray(videomae.running_cell_keep(jnp.asarray(phases), obj.grid, num_masked))
  for i in range(b):
    wanted = np.setdiff1d(np.flatnonzero(keep[i]), visible[i])
    np.testing.assert_array_equal(targets[i], wanted)


def test_patchify_round_trip_and_norm_pix_targets():
  video = _video(b=2)
  sizes = (2, 4, 4)
  tokens = videomae_lib.patchify(video, sizes)
  assert tokens.shape == (2, 64, 2 * 4 * 4 * 3)
  np.testing.assert_array_equal(videomae_lib.unpatchify(tokens, sizes, SHAPE), video)
  # Token (t=1, y=2, x=3) is frames 2-3, rows 8-11, columns 12-15, laid out (dt, dy, dx, c).
  np.testing.assert_array_equal(tokens[1, 1 * 16 + 2 * 4 + 3],
                                np.asarray(video[1, 2:4, 8:12, 12:16]).reshape(-1))
  obj = _objective()
  norm = np.asarray(obj.targets(video)).reshape(2, 64, 32, 3)
  np.testing.assert_allclose(norm.mean(2), 0, atol=1e-5)
  np.testing.assert_allclose(norm.std(2, ddof=1), 1, rtol=1e-4)
  raw = _objective(norm_pix_loss=False).targets(video)
  np.testing.assert_array_equal(raw, tokens)


def test_loss_decreases_and_absent_examples_are_ignored():
  obj, params, grad_fn = _default()
  tx = optax.adam(3e-3)
  update = jax.jit(lambda p, g, o: (lambda u, o: (optax.apply_updates(p, u), o))(
      *tx.update(g, o, p)))
  batch, opt, losses = _batch(), tx.init(params), []
  for i in range(12):
    (loss, metrics), grads = grad_fn(params, batch, jax.random.key(i % 2))
    params, opt = update(params, grads, opt)
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0], losses
  assert float(metrics["videomae/visible_tokens"]) == 4 * 2
  assert float(metrics["videomae/reconstructed_tokens"]) == 4 * 14 // 2
  # An absent example (video_present 0) changes nothing, whatever its clip holds.
  batch = _batch(present=[1, 0, 1, 1, 1, 1, 0, 1])
  (a, _), _ = grad_fn(params, batch, jax.random.key(5))
  batch["video"] = batch["video"].at[1].set(7.0).at[6].set(-3.0)
  (b, m), _ = grad_fn(params, batch, jax.random.key(5))
  np.testing.assert_allclose(a, b, rtol=1e-6)
  assert float(m["videomae/examples"]) == 6


def test_embed_pools_every_token_and_averages_views():
  obj, params, _ = _default()
  video = _video(b=2)
  embed = jax.jit(lambda p, x: obj.embed(p, "video", x))
  z = embed(params, video)
  assert z.shape == (2, 32)
  views = jnp.stack([video, video[::-1]], axis=1)  # [B, V=2, T, H, W, 3]
  np.testing.assert_allclose(embed(params, views), (z + z[::-1]) / 2, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="embeds video only"):
    obj.embed(params, "image", video)


def test_param_tree_mirrors_a_video_tower_and_the_decoder():
  obj = _objective()
  learn = videomae.VideoMAE(videomae_lib.VideoMAE(
      encoder=dict(width=32, depth=1, num_heads=2, patch_size=4),
      decoder=dict(width=16, depth=1, num_heads=2, posemb="learn")), obj.ctx)
  shapes = jax.tree.map(lambda x: x.shape, sharding.unbox(
      jax.eval_shape(learn.init_params, jax.random.key(0))))
  assert shapes["vid"]["embedding"]["kernel"] == (2, 4, 4, 3, 32)  # VideoViT's, scope vid
  assert shapes["vid"]["pos_embedding"] == (1, 16, 32) and "head" not in shapes["vid"]
  assert shapes["dec"]["pos_embedding"] == (1, 64, 16)  # one per token of the 4x4x4 grid
  assert shapes["dec"]["head"]["kernel"] == (16, 2 * 4 * 4 * 3)
  assert "pos_embedding" not in jax.eval_shape(obj.init_params, jax.random.key(0))["dec"]


def test_sharded_loss_and_grad_equal_single_device():
  obj, params, grad_fn = _default()
  batch = _batch(seed=1, present=[1, 1, 1, 0, 1, 1, 1, 1])
  rng = jax.random.key(3)
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


@pytest.mark.parametrize("settings,match", [
    (dict(mask_ratio=1.0), r"mask_ratio must be in \(0, 1\)"),
    (dict(decoder_mask_ratio=0.6), r"use 0.25, 0.5 \(VideoMAE V2\) or 0.75"),
    (dict(norm_pix_loss=1), r"norm_pix_loss must be True or False"),
    (dict(mask_ratio=0.9, decoder_mask=0.5), r"Did you mean 'decoder_mask_ratio'"),
])
def test_bad_settings_fail_when_the_config_loads(settings, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    objectives.settings(dict(name="videomae", **settings))


@pytest.mark.parametrize("shape,settings,match", [
    ((4, 16, 16, 3), {}, r"time slices in multiples of 4 .* t=2"),
    ((8, 12, 12, 3), {}, r"even spatial token grid .* h=3, w=3"),
    ((8, 12, 16, 3), dict(decoder_mask_ratio=0.0), None),
    ((8, 18, 16, 3), {}, r"does not tile into 2x4x4 tubelets"),
    ((8, 4, 4, 3), dict(decoder_mask_ratio=0.0), r"masks 0 of the 1 spatial positions"),
    ((2, 8, 16, 16, 3), {}, r"trains on single clips"),
])
def test_clip_shape_errors_say_what_to_change(shape, settings, match):
  if match is None:
    assert _objective(shape, **settings).grid == (4, 3, 4)
    return
  with pytest.raises(config_lib.ConfigError, match=match):
    _objective(shape, **settings)


def test_model_and_objective_refuse_wrong_pairings():
  with pytest.raises(TypeError, match="VideoMAE fixes"):
    get_model("videomae", encoder=dict(pool="gap"))
  with pytest.raises(TypeError, match="Invalid model.decoder option"):
    get_model("videomae", decoder=dict(heads=2))
  with pytest.raises(ValueError, match="model.decoder.posemb='rope'; use 'sincos' or 'learn'"):
    get_model("videomae", decoder=dict(posemb="rope"))
  ctx = objectives.Context(modalities=("video",), shapes={"video": SHAPE})
  with pytest.raises(config_lib.ConfigError, match="needs model_name='videomae'"):
    videomae.VideoMAE(get_model("towers", towers={"text": {"vocab_size": 8}}), ctx)
  with pytest.raises(config_lib.ConfigError, match="input.pp_modalities"):
    videomae.VideoMAE(get_model("videomae"), objectives.Context())


def test_paper_config_builds_the_v2_b16_token_budget():
  config = config_lib.load("configs/videomae_v2_b16.py", {})
  setup = train.build(config, devices=jax.devices()[:1])
  obj = setup.objective
  # 16 frames at 224 px in 2x16x16 tubelets: 8x14x14; 20 of 196 positions visible per slice,
  # half of the 1,408 masked tokens reconstructed (VideoMAE V2's ViT-B recipe).
  assert (obj.grid, obj.num_visible, obj.num_targets) == ((8, 14, 14), 160, 704)
  assert config.total_examples == 200 * 240_436 * 4 and config.batch_size == 4096
