"""Dense-feature linear probes (big_mm/evaluators/dense_probe.py): the probes recover known
linear maps, the metrics match hand-computed values, and the evaluator runs on the scenes data
after a tiny towers run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_mm import config as config_lib
from big_mm.evaluators import dense_probe


def _features(n=24, h=4, w=4, d=6, seed=0):
  return np.random.default_rng(seed).normal(size=(n, h, w, d)).astype(np.float32)


def test_segmentation_probe_recovers_a_linear_map():
  x = _features()
  rng = np.random.default_rng(1)
  w_true, c_true = 4.0 * rng.normal(size=(6, 3)), rng.normal(size=3)
  # Labels at 4x the patch grid: the argmax of the bilinearly upsampled true logits.
  logits = dense_probe.upsample(jnp.asarray(x @ w_true + c_true, jnp.float32), (16, 16))
  labels = np.array(jnp.argmax(logits, -1))
  labels[0, 0, 0] = 255  # an ignore label: skipped in training and scoring
  probe, losses = dense_probe.fit_segmentation(x, labels, num_classes=3, steps=300, lr=1.0)
  assert losses[-1] < 0.1 * losses[0]
  pred = dense_probe.predict_segmentation(probe, x, (16, 16))
  metrics = dense_probe.segmentation_metrics(pred, labels, 3)
  assert metrics["miou"] > 0.985 and metrics["pixel_acc"] > 0.99, metrics
  # Deterministic: the same fit twice gives the same weights.
  again, _ = dense_probe.fit_segmentation(x, labels, num_classes=3, steps=300, lr=1.0)
  np.testing.assert_array_equal(again["w"], probe["w"])


def test_depth_probe_recovers_a_linear_map():
  x = _features()
  w_true = np.random.default_rng(2).normal(size=6)
  depth = np.array(dense_probe.upsample(jnp.asarray(x @ w_true + 5.0)[..., None],
                                          (16, 16)))[..., 0]
  depth[1, :3] = 0.0  # no measurement: left out of the fit and the metrics
  w = dense_probe.fit_depth(x, depth, l2_reg=1e-6)
  np.testing.assert_allclose(w, np.concatenate([w_true, [5.0]]), atol=1e-4)
  metrics = dense_probe.depth_metrics(dense_probe.predict_depth(w, x, (16, 16)), depth)
  assert metrics["rmse"] < 1e-4 and metrics["abs_rel"] < 1e-4 and metrics["delta1"] == 1.0


def test_metric_formulas_by_hand():
  true = np.array([[[0, 0, 1, 1], [2, 2, 2, 255]]])
  pred = np.array([[[0, 1, 1, 1], [2, 2, 0, 0]]])
  # class 0: intersection 1, union = pred 2 + true 2 - 1 = 3; class 1: 2 / (3 + 2 - 2) = 2/3;
  # class 2: 2 / (2 + 3 - 2) = 2/3. Pixel 255 is ignored: 5 of 7 right.
  m = dense_probe.segmentation_metrics(pred, true, 3)
  assert m["miou"] == pytest.approx((1 / 3 + 2 / 3 + 2 / 3) / 3)
  assert m["pixel_acc"] == pytest.approx(5 / 7)
  d_true = np.array([[[1.0, 2.0], [4.0, 0.0]]])
  d_pred = np.array([[[1.5, 2.0], [3.0, 9.0]]])  # the last pixel has no depth: skipped
  m = dense_probe.depth_metrics(d_pred, d_true)
  assert m["abs_rel"] == pytest.approx((0.5 / 1 + 0 + 1 / 4) / 3)
  assert m["rmse"] == pytest.approx(np.sqrt((0.25 + 0 + 1) / 3))
  assert m["delta1"] == pytest.approx(1 / 3)  # 1.5 / 1 and 4 / 3 are >= 1.25


@pytest.mark.parametrize("changes,error", [
    (dict(tasks=("normals",)), r"evals.e.tasks entry='normals' is not valid|normals"),
    (dict(tasks="depth"), r"evals.e.tasks must be a non-empty tuple"),
    (dict(seg_lr=0.0), r"evals.e.seg_lr must be a number > 0"),
    (dict(seg_steps=0), r"evals.e.seg_steps must be an integer >= 1"),
    (dict(num_classes=1), r"evals.e.num_classes must be an integer >= 2"),
    (dict(depth_l2=1.0), r"'evals.e.depth_l2'.*Did you mean 'depth_l2_reg'"),
])
def test_config_errors(changes, error):
  from big_mm import evaluators
  with pytest.raises(config_lib.ConfigError, match=error):
    evaluators.check("e", dict(type="dense_probe", **changes))


def _scenes_config(scenes_dir, **evals):
  from conftest import tiny_config
  return tiny_config(scenes_dir, **{"input.data": "multimodal_scenes",
                                    "input.pp_image": "decode|resize(32)|flip_lr|value_range(-1,1)",
                                    "total_steps": 2, "evals": evals})


def test_evaluator_on_scenes_after_a_towers_run(scenes_dir, tmp_path):
  from big_mm import evaluate, train
  ev = dict(type="dense_probe", split="test[:48]", train_split="train[:96]", batch_size=32,
            pp_image="decode|resize(32)|value_range(-1,1)", seg_steps=50, num_classes=4)
  config = _scenes_config(scenes_dir, dense=ev)
  train.train(config, str(tmp_path))
  out = evaluate.evaluate(config, str(tmp_path))
  assert out["eval/dense/num_examples"] == 48 and out["eval/dense/num_train_examples"] == 96
  assert 0 < out["eval/dense/semseg/miou"] <= 1 and 0 < out["eval/dense/semseg/pixel_acc"] <= 1
  # Depths are 2-14 m: a fitted linear probe is far closer than predicting 0.
  assert 0 < out["eval/dense/depth/abs_rel"] < 0.8 and 0 < out["eval/dense/depth/rmse"] < 5
  # The patch grid: 32x32 images, 8x8 patches, the tiny model's width 32.
  setup = train.build(config)
  params = train.make_train_state(setup).init(jax.random.key(0))["params"]
  with train.use_mesh(setup):
    feats = jax.jit(setup.objective.patch_features)(params, jnp.zeros((2, 32, 32, 3)))
  assert feats.shape == (2, 4, 4, 32)


def test_split_without_dense_maps_is_refused(data_dir):
  """digits_captions has no depth: the error names the evaluator and what to do."""
  from big_mm import evaluators, train
  from conftest import tiny_config
  ev = dict(type="dense_probe", split="test[:16]", train_split="train[:16]", batch_size=16,
            pp_image="decode|resize(32)|value_range(-1,1)", tasks=("depth",))
  config = tiny_config(data_dir, evals=dict(dense=ev))
  setup = train.build(config)
  params = train.make_train_state(setup).init(jax.random.key(0))["params"]
  context = evaluators.EvalContext(config, setup.mesh, setup.objective)
  evaluator = evaluators.build("dense", config.evals.dense, context)
  with train.use_mesh(setup), pytest.raises(
      ValueError, match=r"evals.dense \(dense_probe\) reads \['depth'\] maps"):
    evaluator(params)
