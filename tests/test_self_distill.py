"""SigLIP 2's self-distillation part (big_mm/objectives/self_distill.py): the SILC and TIPS
losses against plain numpy, nothing before the switch-on step (loss, grads, teacher = student),
the EMA teacher and centres after it, 8-device data sharding against one device, and a run
killed before and resumed across the switch-on step against the uninterrupted run."""
import flax.linen as nn
import jax
import numpy as np
import pytest
from scipy import special

from big_mm import config as config_lib
from big_mm import sharding, train
from big_mm.models.towers import Towers
from big_mm.objectives import Context, siglip2
from big_mm.objectives import self_distill as sd_lib
from conftest import tiny_config
from reliability import faults
from test_extra_state import restored_state

TOWERS = dict(
    image=dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=(4, 4), pool="map"),
    text=dict(width=16, depth=1, mlp_dim=32, num_heads=2, vocab_size=32))
SMALL = dict(self_distill_local_crops=2, self_distill_local_crop_size=8,
             self_distill_head_hidden=16, self_distill_head_bottleneck=8, silc_head_dim=32,
             tips_head_dim=24)
SD = dict(silc_weight=1.0, tips_weight=0.25, **SMALL)
ONE = sharding.make_mesh(dict(data=-1), jax.devices()[:1])


def _model():
  return Towers(towers=TOWERS, out_dim=8, temperature_init=10.0, bias_init=-5.0)


def _batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, 16, 16, 3)).astype(np.float32),
          "text": rng.integers(1, 32, (n, 6)).astype(np.int32)}


def _objective(mesh=ONE, total_steps=10, **settings):
  ctx = Context(mesh=mesh, batch_size=8, text_len=6, image_size=(16, 16),
                total_steps=total_steps)
  return siglip2.Siglip2(_model(), ctx, **settings)


@pytest.fixture(autouse=True)
def _rules():
  with nn.logical_axis_rules(sharding.rules(())):
    yield


def _init(obj):
  with jax.set_mesh(obj.ctx.mesh):
    # Jitted: eager init compiles each op on its own (~500 compiles, most of this file's time).
    params = nn.unbox(jax.jit(obj.init_params)(jax.random.key(0)))
    # A teacher and centres unlike the student's, so the test sees which is used.
    extra = obj.init_extra_state(params)
  extra = jax.tree.map(lambda a: a + 0.05 * np.random.default_rng(1).normal(
      size=a.shape).astype(np.float32), extra)
  return params, extra


def _head_ref(p, x):
  """DINO's head in numpy."""
  gelu = lambda v: 0.5 * v * (1 + special.erf(v / np.sqrt(2)))
  x = gelu(x @ p["mlp_0"]["kernel"] + p["mlp_0"]["bias"])
  x = gelu(x @ p["mlp_1"]["kernel"] + p["mlp_1"]["bias"])
  x = x @ p["bottleneck"]["kernel"] + p["bottleneck"]["bias"]
  x = x / np.linalg.norm(x, axis=-1, keepdims=True)
  return x @ (p["last"] / np.linalg.norm(p["last"], axis=0, keepdims=True))


def _ce_ref(student, teacher, center, ts=0.1, tt=0.04):
  target = special.softmax((teacher - center) / tt, -1)
  return -np.sum(target * special.log_softmax(student / ts, -1), -1)


def test_crop_and_resize_and_patch_mask():
  images = np.random.default_rng(0).normal(size=(2, 16, 12, 3)).astype(np.float32)
  boxes = np.array([[2, 4, 8, 8], [0, 0, 16, 12]], np.float32)
  got = np.asarray(sd_lib.crop_and_resize(images, boxes, 8))
  np.testing.assert_allclose(got[0], images[0, 2:10, 4:12], atol=1e-5)  # scale 1: the pixels
  want = jax.image.resize(images[1], (8, 8, 3), "linear", antialias=True)
  np.testing.assert_allclose(got[1], want, atol=1e-5)  # the whole image: plain resize
  drawn = sd_lib.local_boxes(jax.random.key(0), 64, 8, (16, 12), (0.05, 0.4))
  y0, x0, h, w = np.moveaxis(np.asarray(drawn), -1, 0)
  assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= 16 + 1e-4).all()
  assert (x0 + w <= 12 + 1e-4).all()
  area = h * w / (16 * 12)
  assert area.min() > 0.04 and area.max() < 0.41 and area.std() > 0.05
  mask = np.asarray(sd_lib.random_patch_mask(jax.random.key(0), 4, 16, 0.5))
  assert (mask.sum(1) == 8).all() and len({tuple(m) for m in mask}) == 4


def test_losses_equal_a_numpy_reference(monkeypatch):
  obj = _objective(**SD)
  part = obj.parts[-1]
  assert part.start == 8 and part.crop_size == 8
  params, extra = _init(obj)
  extra = extra["self_distill"]
  batch = _batch()
  images = batch["image"]
  # Fixed boxes of the crop size (crops are then the pixels) and a fixed mask.
  corners = np.random.default_rng(2).integers(0, 9, (8, 2, 2)).astype(np.float32)
  boxes = np.concatenate([corners, np.full((8, 2, 2), 8.0, np.float32)], -1)
  mask = np.random.default_rng(3).random((8, 16)) < 0.5
  monkeypatch.setattr(sd_lib, "local_boxes", lambda *a: boxes)
  monkeypatch.setattr(sd_lib, "random_patch_mask", lambda *a: mask)
  with jax.set_mesh(ONE):
    loss, metrics = jax.jit(part.loss)(params, batch, jax.random.key(1), None, extra=extra,
                                       step=np.int32(8))
  # Jitted: eagerly, each op of each call compiled on its own.
  apply = jax.jit(part.vit.apply, static_argnames=("posemb_shape",))
  teacher = jax.device_get(extra["teacher"])
  t_pooled, t_out = apply({"params": teacher["img"]}, images)
  # SILC: the student's local crops (cut by hand) against the teacher's whole image.
  crops = np.stack([images[i, int(y):int(y) + 8, int(x):int(x) + 8]
                    for i in range(8) for y, x in corners[i]])
  s_pooled, _ = apply({"params": params["img"]}, crops, posemb_shape=(4, 4))
  s_logits = _head_ref(params["sd"]["silc_head"], np.asarray(s_pooled)).reshape(8, 2, -1)
  t_logits = _head_ref(teacher["sd"]["silc_head"], np.asarray(t_pooled))
  want_silc = _ce_ref(s_logits, t_logits[:, None], extra["center"]["silc"]).mean()
  np.testing.assert_allclose(metrics["silc_loss"], want_silc, rtol=2e-5)
  # TIPS: masked patch embeddings are the mask token; the loss at masked positions only.
  img = {**params["img"], "mask_token": params["sd"]["mask_token"] + 0.3}
  _, s_out = apply({"params": img}, images, patch_mask=mask)
  _, plain = apply({"params": params["img"]}, images)
  posemb = np.asarray(params["img"]["pos_embedding"])[0]
  np.testing.assert_allclose(s_out["with_posemb"][mask], (posemb + 0.3)[np.nonzero(mask)[1]],
                             rtol=1e-6)
  np.testing.assert_array_equal(s_out["with_posemb"][~mask], plain["with_posemb"][~mask])
  _, s_out = apply({"params": {**params["img"],
                                   "mask_token": params["sd"]["mask_token"]}},
                       images, patch_mask=mask)
  s_logits = _head_ref(params["sd"]["tips_head"], np.asarray(s_out["pre_logits_2d"]).reshape(
      8, 16, -1))
  t_logits = _head_ref(teacher["sd"]["tips_head"], np.asarray(t_out["pre_logits_2d"]).reshape(
      8, 16, -1))
  ce = _ce_ref(s_logits, t_logits, extra["center"]["tips"])
  want_tips = np.mean([ce[i][mask[i]].mean() for i in range(8)])
  np.testing.assert_allclose(metrics["tips_loss"], want_tips, rtol=2e-5)
  np.testing.assert_allclose(loss, want_silc + 0.25 * want_tips, rtol=2e-5)
  assert metrics["self_distill_on"] == 1.0
  stats = metrics[sd_lib.base.EXTRA_STATS]
  np.testing.assert_allclose(stats["tips"], t_logits.mean((0, 1)), rtol=1e-4, atol=1e-6)


def test_before_the_switch_it_is_the_plain_objective_and_the_teacher_tracks_the_student():
  obj, plain = _objective(**SD), _objective()
  params, extra = _init(obj)
  batch = _batch()
  with jax.set_mesh(ONE):
    grad_fn = jax.jit(obj.value_and_grad)
    (got, metrics), grads = grad_fn(params, batch, jax.random.key(1), extra=extra,
                                    step=np.int32(7))
    plain_params = {k: v for k, v in params.items() if k != "sd"}
    (want, _), want_grads = jax.jit(plain.value_and_grad)(plain_params, batch,
                                                          jax.random.key(1), step=np.int32(7))
    (on_loss, on_metrics), on_grads = grad_fn(params, batch, jax.random.key(1), extra=extra,
                                              step=np.int32(8))
  assert metrics["self_distill_on"] == 0.0 and metrics["silc_loss"] == 0.0
  np.testing.assert_allclose(got, want, rtol=1e-6)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7),
               {k: v for k, v in grads.items() if k != "sd"}, want_grads)
  assert all(not np.any(g) for g in jax.tree.leaves(grads["sd"]))
  # Switched on: the losses and the heads' / mask token's gradients are there.
  assert on_metrics["self_distill_on"] == 1.0 and on_loss > want + 1.0
  assert all(np.any(g) for g in jax.tree.leaves(on_grads["sd"]))

  update = jax.jit(obj.update_extra_state)
  stats = on_metrics[sd_lib.base.EXTRA_STATS]  # each part's own
  student = {"img": params["img"], "sd": {k: params["sd"][k] for k in ("silc_head",
                                                                       "tips_head")}}
  decay, m = 0.996, 0.9
  for step in (1, 8):  # steps up to the start: the teacher is the student, centres stay
    new = update(extra, params, np.int32(step), stats)["self_distill"]
    jax.tree.map(np.testing.assert_array_equal, new["teacher"], student)
    jax.tree.map(np.testing.assert_array_equal, new["center"], extra["self_distill"]["center"])
  new = update(extra, params, np.int32(9), stats)["self_distill"]  # the first step with losses
  old = extra["self_distill"]
  jax.tree.map(lambda n, t, p: np.testing.assert_allclose(n, decay * t + (1 - decay) * p,
                                                          rtol=1e-6, atol=1e-7),
               new["teacher"], old["teacher"], student)
  for k in ("silc", "tips"):
    np.testing.assert_allclose(new["center"][k], m * old["center"][k]
                               + (1 - m) * stats["self_distill"][k], rtol=1e-6)


def test_sharded_over_8_devices_equals_one_device():
  mesh = sharding.make_mesh(dict(data=8), jax.devices()[:8])
  one, eight = _objective(**SD), _objective(mesh=mesh, **SD)
  params, extra = jax.device_get(_init(one))
  batch = _batch()
  results = []
  for obj in (one, eight):
    with jax.set_mesh(obj.ctx.mesh):
      placed = jax.device_put(batch, sharding.batch_sharding(obj.ctx.mesh))
      state = jax.device_put((params, extra), sharding.replicated(obj.ctx.mesh))
      results.append(jax.jit(obj.value_and_grad)(state[0], placed, jax.random.key(1),
                                                 extra=state[1], step=np.int32(9)))
  ((loss1, m1), g1), ((loss8, m8), g8) = results
  assert m8["self_distill_on"] == 1.0 and m8["tips_loss"] > 0
  for key in ("silc_loss", "tips_loss", "contrastive_loss"):
    np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g8, g1)


def test_bad_settings_fail_naming_the_key():
  with pytest.raises(config_lib.ConfigError, match="self_distill_local_crop_size"):
    _objective(silc_weight=1.0, self_distill_local_crop_size=6)
  with pytest.raises(config_lib.ConfigError, match="tips_mask_ratio"):
    _objective(tips_weight=1.0, tips_mask_ratio=1.0)
  with pytest.raises(config_lib.ConfigError, match="NaFlex"):
    ctx = Context(mesh=ONE, batch_size=8, text_len=6, image_patches=(16, 4), total_steps=10)
    siglip2.Siglip2(_model(), ctx, silc_weight=1.0)
  assert not _objective(**SMALL).parts  # both weights 0: nothing added


def _sd_config(data_dir):
  config = tiny_config(data_dir, objective=dict(
      name="siglip2", silc_weight=1.0, tips_weight=0.25, self_distill_start_fraction=0.5,
      self_distill_ema_decay=0.9, self_distill_local_crop_size=16, **{
          k: v for k, v in SMALL.items() if k != "self_distill_local_crop_size"}))
  return config


def test_resumed_across_the_switch_on_equals_the_uninterrupted_run(data_dir, tmp_path,
                                                                    monkeypatch):
  from conftest import read_metrics
  config = _sd_config(data_dir)
  straight, workdir = str(tmp_path / "straight"), str(tmp_path / "run")
  one = jax.devices()[:1]  # one device: the sharded step has its own test above
  train.train(config, straight, devices=one)
  on = [r["self_distill_on"] for r in read_metrics(straight) if "self_distill_on" in r]
  assert on == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]  # 6 steps, start_fraction 0.5
  with monkeypatch.context() as m:
    faults.on_batch(m, 3, lambda batch: (_ for _ in ()).throw(faults.Crash()))
    with pytest.raises(faults.Crash):
      # A checkpoint at step 2; it resumes before the switch-on.
      train.train(config, workdir, devices=one)
  train.train(config, workdir, devices=one)
  want, got = restored_state(config, straight, 6), restored_state(config, workdir, 6)
  jax.tree.map(np.testing.assert_array_equal, got["params"], want["params"])
  jax.tree.map(np.testing.assert_array_equal, got["extra"], want["extra"])
  # The teacher is an EMA now (not the student), the centres have moved.
  teacher = want["extra"]["self_distill"]["teacher"]
  assert not np.array_equal(teacher["img"]["embedding"]["kernel"],
                            want["params"]["img"]["embedding"]["kernel"])
  assert np.any(want["extra"]["self_distill"]["center"]["silc"])
  # Before the switch-on the teacher was the student.
  at_start = restored_state(config, straight, 2)
  jax.tree.map(np.testing.assert_array_equal, at_start["extra"]["self_distill"]["teacher"]["img"],
               at_start["params"]["img"])
