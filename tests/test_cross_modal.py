"""cross_modal evaluator: metric arithmetic on hand-computed arrays, the whole evaluator (jit,
mesh, masking, mean baselines) over in-memory batches with a fake objective, config checks."""
import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_mm import config as config_lib, evaluators, sharding
from big_mm.evaluators import common, cross_modal

H = W = 4
C = 4  # semseg classes


def test_depth_abs_rel_and_delta1_over_valid_pixels():
  m = cross_modal.DepthMetrics()
  # Pixels: exact; 2 vs 4 (|e|/d 0.5, ratio 2); 4 vs 5 (0.2, ratio exactly 1.25: not < 1.25);
  # a negative prediction (1.5, never within); true depth 0 (ignored).
  m.update(np.array([[1.0, 2.0, 4.0, -1.0, 7.0]]), np.array([[1.0, 4.0, 5.0, 2.0, 0.0]]))
  assert m.result() == pytest.approx({"abs_rel": 2.2 / 4, "delta1": 1 / 4})
  m.update(np.array([[3.3]]), np.array([[3.0]]))  # Pooled over pixels, not per update.
  assert m.result() == pytest.approx({"abs_rel": 2.3 / 5, "delta1": 2 / 5})


def test_semseg_miou_leaves_out_absent_classes_and_ignores_unlabelled_pixels():
  m = cross_modal.SemsegMetrics(num_classes=4)
  # Class 3 is only predicted on an unlabelled (255) pixel: absent, left out of the mean.
  m.update(np.array([0, 1, 1, 1, 0, 3]), np.array([0, 0, 1, 1, 2, 255]))
  # IoU: class 0 1/3 (1 hit; 2 predicted + 2 true - 1), class 1 2/3, class 2 0/1.
  assert m.result() == pytest.approx({"miou": 1 / 3, "pixel_acc": 3 / 5})
  m.update(np.array([3]), np.array([3]))  # Accumulated over the split: now class 3 counts.
  assert m.result() == pytest.approx({"miou": (1 / 3 + 2 / 3 + 0 + 1) / 4, "pixel_acc": 4 / 6})


def test_psnr_per_image_in_unit_range_averaged():
  m = cross_modal.RgbMetrics((-1.0, 1.0))
  true = np.zeros((2, 2, 2, 3))  # 0.5 in [0, 1]
  pred = np.stack([np.full((2, 2, 3), 0.2),    # 0.6: MSE 0.01, 20 dB
                   np.full((2, 2, 3), 3.0)])   # clipped to 1.0: MSE 0.25
  m.update(pred, true)
  assert m.result()["psnr"] == pytest.approx((20.0 + 10 * np.log10(4.0)) / 2)
  perfect = cross_modal.RgbMetrics((0.0, 255.0))
  perfect.update(np.full((1, 2, 2, 3), 17.0), np.full((1, 2, 2, 3), 17.0))
  assert perfect.result()["psnr"] == pytest.approx(100.0)


def test_text_exact_match_and_token_accuracy_cut_at_eos():
  m = cross_modal.TextMetrics()
  true = np.array([[5, 6, 7, 1, 0, 0], [5, 6, 1, 0, 0, 0], [4, 1, 0, 0, 0, 0]])
  pred = np.array([[5, 6, 7, 1, 9, 9],   # exact: what follows the EOS is not read
                   [5, 7, 1, 1, 1, 1],   # 5 and the EOS of [5, 6, 1] at their positions: 2 / 3
                   [4, 3, 3, 3, 3, 3]])  # no EOS: 4 right, the EOS missed: 1 / 2
  m.update(pred, true)
  assert m.result() == pytest.approx({"exact_match": 1 / 3, "token_acc": (4 + 2 + 1) / 9})
  np.testing.assert_array_equal(cross_modal.caption_tokens([3, 4, 0, 5]), [3, 4])


def test_text_baseline_is_the_most_frequent_training_caption():
  captions = np.array([[3, 4, 1, 0], [5, 1, 0, 0], [3, 4, 1, 0], [6, 7, 8, 1]])
  batches = [({"text": captions[:2]}, np.ones(2, bool)),
             ({"text": captions[2:]}, np.ones(2, bool))]
  means = cross_modal.training_means(batches, ("text",), num_examples=4, num_classes=0)
  np.testing.assert_array_equal(means["text"], [3, 4, 1, 0])


@pytest.mark.parametrize("pp,expected", [
    ("decode|resize(32)|value_range(-1,1)", (-1.0, 1.0)),
    ("decode|resize(32)", (0.0, 255.0)),
    ("decode|value_range(0,1)|value_range(-1,1,0,1)", (-1.0, 1.0)),
    ("decode|normalize('imagenet')", None),
])
def test_pp_pixel_range(pp, expected):
  assert cross_modal.pp_pixel_range(pp) == (pytest.approx(expected) if expected else None)


# ---------------------------------------------------------------------------------------
# The evaluator over in-memory batches (the pipeline's layout: image / depth / semseg,
# {m}_present, mask), a fake objective and 8 devices.

def _batch(rng, n_real, *, depth_absent=(), semseg_absent=()):
  """16 rows: the first n_real real, the rest padding full of values that would change
  every metric if they were counted."""
  b = {"image": rng.uniform(-1, 1, (16, H, W, 3)).astype(np.float32),
       "depth": rng.uniform(0.5, 5.0, (16, H, W)).astype(np.float32),
       "semseg": rng.integers(0, C, (16, H, W)).astype(np.int32),
       "mask": (np.arange(16) < n_real).astype(np.int32),
       "depth_present": np.ones(16, np.int32), "semseg_present": np.ones(16, np.int32)}
  b["depth"][b["depth"] < 1.0] = 0.0  # invalid pixels
  b["image"][n_real:], b["depth"][n_real:], b["semseg"][n_real:] = 1.0, 100.0, 3
  for key, rows in (("depth", depth_absent), ("semseg", semseg_absent)):
    b[f"{key}_present"][list(rows)] = 0
    b[key][list(rows)] = 0  # the pipeline's value for a missing field
  return b


class _FakeMultiMAE:
  """predict = perfect * truth + (1 - perfect) * params' constant maps. Records its traces."""

  modalities = ("rgb", "depth", "semseg", "text")
  num_semseg_classes = C

  def __init__(self):
    self.traces = []

  def predict(self, params, batch, *, inputs, targets):
    self.traces.append((inputs, targets))
    p = params["perfect"]
    truth = {"rgb": batch["image"], "depth": batch["depth"],
             "semseg": 10.0 * jax.nn.one_hot(batch["semseg"], C)}
    const = {"rgb": params["rgb"], "depth": params["depth"],
             "semseg": 10.0 * jax.nn.one_hot(params["semseg"], C)}
    return {t: p * truth[t] + (1 - p) * jnp.broadcast_to(const[t], truth[t].shape)
            for t in targets}


def _rows(batches, key, present=()):
  keep = [(b["mask"] > 0) & np.all([b[f"{m}_present"] > 0 for m in present], axis=0)
          for b in batches]
  return np.concatenate([b[key][k] for b, k in zip(batches, keep)])


def _reference_means(train, n):
  """Hand-written training means of the first n present examples."""
  depth = _rows(train, "depth", ["depth"])[:n]
  valid = depth > 0
  depth_mean = np.where(valid.any(0), depth.sum(0) / np.maximum(valid.sum(0), 1),
                        depth[valid].mean())
  semseg = _rows(train, "semseg", ["semseg"])[:n]
  majority = np.array([[np.argmax(np.bincount(semseg[:, i, j], minlength=C))
                        for j in range(W)] for i in range(H)])
  return {"depth": depth_mean, "rgb": _rows(train, "image")[:n].mean(0), "semseg": majority}


def _reference_metrics(pred, test):
  """The module docstring's definitions, written out, for constant predictions."""
  d = _rows(test, "depth", ["depth"])
  valid = d > 0
  p = np.broadcast_to(pred["depth"], d.shape)[valid]
  abs_rel = np.mean(np.abs(p - d[valid]) / d[valid])
  delta1 = np.mean(np.maximum(p / d[valid], d[valid] / p) < 1.25)
  s = _rows(test, "semseg", ["semseg"])
  ps = np.broadcast_to(pred["semseg"], s.shape)
  ious = [np.sum((ps == c) & (s == c)) / np.sum((ps == c) | (s == c)) for c in range(C)
          if np.any((ps == c) | (s == c))]
  img = _rows(test, "image", ["depth", "semseg"])
  err = np.clip((pred["rgb"] + 1) / 2, 0, 1) - (img + 1) / 2
  psnr = np.mean(10 * np.log10(1 / np.mean(err.reshape(len(img), -1) ** 2, axis=1)))
  return {"depth_from_rgb/abs_rel": abs_rel, "depth_from_rgb/delta1": delta1,
          "semseg_from_rgb/miou": np.mean(ious), "semseg_from_rgb/pixel_acc": np.mean(ps == s),
          "rgb_from_depth_semseg/psnr": psnr}


@pytest.fixture
def setup(monkeypatch):
  rng = np.random.default_rng(0)
  train = [_batch(rng, 16, depth_absent=[2], semseg_absent=[5]), _batch(rng, 16)]
  for b in train:
    b["depth"][:, 0, 0] = 0.0  # never valid: the baseline fills in the mean valid depth
  test = [_batch(rng, 16, depth_absent=[0, 1], semseg_absent=[3]),
          _batch(rng, 9, semseg_absent=[4])]
  config = config_lib.load(config_lib.ConfigDict(dict(total_steps=1, evals={"e": dict(
      type="cross_modal", batch_size=16, baseline_examples=20,
      pp_image="decode|resize(4)|value_range(-1,1)")})))
  mesh = sharding.make_mesh(config.mesh)
  splits = {config.input.split: train, config.evals.e.split: test}
  assert len(splits) == 2

  def fake_iterate_split(input_cfg, batch_size, mesh_):
    assert batch_size == 16 and mesh_ is mesh
    reads[input_cfg.split] = reads.get(input_cfg.split, 0) + 1
    for b in splits[input_cfg.split]:
      yield jax.device_put(b, sharding.batch_sharding(mesh)), b["mask"] > 0

  reads = {}
  monkeypatch.setattr(common, "iterate_split", fake_iterate_split)
  return config, mesh, train, test, reads


def _run(config, mesh, objective, params, ev=None):
  """The evaluator of `ev` (default: config.evals.e), built for one run and called once."""
  context = evaluators.EvalContext(config, mesh, objective)
  return evaluators.build("cm", ev or config.evals.e, context)(params)


def test_evaluator_perfect_and_constant_predictors_and_baselines(setup):
  config, mesh, train, test, reads = setup
  objective = _FakeMultiMAE()
  means = _reference_means(train, 20)
  params = {"perfect": np.float32(0.0), "rgb": means["rgb"].astype(np.float32),
            "depth": means["depth"].astype(np.float32), "semseg": means["semseg"]}
  # Built once per run, called at each evaluation.
  evaluate = evaluators.build("cm", config.evals.e, evaluators.EvalContext(config, mesh,
                                                                           objective))
  const = evaluate(params)
  perfect = evaluate(dict(params, perfect=np.float32(1.0)))

  reference = _reference_metrics(means, test)
  for key, value in reference.items():
    # The constant predictor = the training mean: its metrics are the baselines', and both
    # match the hand-written definitions over real, present examples only.
    assert const[f"eval/cm/{key}"] == pytest.approx(value, rel=1e-5), key
    assert const[f"eval/cm/{key}_mean_baseline"] == pytest.approx(value, rel=1e-5), key
    assert perfect[f"eval/cm/{key}_mean_baseline"] == pytest.approx(value, rel=1e-5), key
  assert 0 < reference["semseg_from_rgb/miou"] < 0.5
  for key, value in {"depth_from_rgb/abs_rel": 0.0, "depth_from_rgb/delta1": 1.0,
                     "semseg_from_rgb/miou": 1.0, "semseg_from_rgb/pixel_acc": 1.0,
                     "rgb_from_depth_semseg/psnr": 100.0}.items():
    assert perfect[f"eval/cm/{key}"] == pytest.approx(value, abs=1e-6), key
  # Real rows: 16 + 9; minus absent targets (and inputs, for rgb from depth + semseg).
  assert {k: perfect[f"eval/cm/{k}/num_examples"] for k in
          ("depth_from_rgb", "semseg_from_rgb", "rgb_from_depth_semseg")} == {
              "depth_from_rgb": 23, "semseg_from_rgb": 23, "rgb_from_depth_semseg": 21}
  # The training split is read once for the baselines, the eval split at each of the 2 runs.
  assert reads == {config.input.split: 1, config.evals.e.split: 2}
  # One trace per distinct inputs (depth and semseg from rgb share a call), reused.
  assert objective.traces == [(("rgb",), ("depth", "semseg")), (("depth", "semseg"), ("rgb",))]


def test_evaluator_state_belongs_to_its_run(setup):
  """A new run's evaluator computes its own baselines, and a finished run's objective (with the
  evaluator's jitted functions) is freed: no module-level cache outlives the run."""
  config, mesh, _, _, reads = setup
  params = {"perfect": np.float32(1.0), "rgb": 0.0, "depth": 1.0, "semseg": 0}
  objective = _FakeMultiMAE()
  first = _run(config, mesh, objective, params)
  assert _run(config, mesh, _FakeMultiMAE(), params) == first
  assert reads == {config.input.split: 2, config.evals.e.split: 2}
  freed = weakref.ref(objective)
  del objective
  gc.collect()
  assert freed() is None


def test_evaluator_without_baselines(setup):
  config, mesh, *_ = setup
  ev = config_lib.ConfigDict(dict(config.evals.e.to_dict(), baseline_examples=0,
                                  predictions=(("depth", ("rgb", "semseg")),)))
  params = {"perfect": 1.0, "rgb": 0.0, "depth": 1.0, "semseg": 0}
  out = _run(config, mesh, _FakeMultiMAE(), params, ev)
  assert out == {"eval/cm/depth_from_rgb_semseg/abs_rel": 0.0,
                 "eval/cm/depth_from_rgb_semseg/delta1": 1.0,
                 "eval/cm/depth_from_rgb_semseg/num_examples": 21.0}


def test_evaluator_checks_modalities_and_rgb_range(setup):
  config, mesh, *_ = setup
  objective = _FakeMultiMAE()
  objective.modalities = ("rgb", "depth")
  with pytest.raises(ValueError, match=r"\['semseg'\] not among the objective's modalities"):
    _run(config, mesh, objective, {})
  with pytest.raises(TypeError, match=r"has no predict\(\).*multimae"):
    _run(config, mesh, object(), {})
  ev = config_lib.ConfigDict(dict(config.evals.e.to_dict(),
                                  pp_image="decode|resize(4)|value_range(0,1)"))
  with pytest.raises(ValueError, match=r"rgb_range=\(-1.0, 1.0\).*rgb_range=\(0.0, 1.0\)"):
    _run(config, mesh, _FakeMultiMAE(), {}, ev)
  ev = config_lib.ConfigDict(dict(config.evals.e.to_dict(), predictions=(("depth", ("text",)),)))
  with pytest.raises(ValueError, match=r"needs 'text' in the batches.*input.modalities"):
    _run(config, mesh, _FakeMultiMAE(), {}, ev)


@pytest.mark.parametrize("changes,error", [
    (dict(predictions=(("depth", "rgb"),)), r"predictions\[0\].*must be a pair"),
    (dict(predictions=(("depth", ("depth", "rgb")),)), r"not the target itself"),
    (dict(predictions=(("label", ("rgb",)),)), r"predictions\[0\] target='label'.*'text'"),
    (dict(predictions=(("depth", ("rgbb",)),)), r"input='rgbb'.*Did you mean 'rgb'"),
    (dict(predictions=()), r"non-empty tuple"),
    (dict(baseline_examples=-1), r"baseline_examples must be an integer >= 0"),
    (dict(rgb_range=(1.0, -1.0)), r"rgb_range must be \(lo, hi\) with lo < hi"),
    (dict(baseline=10), r"'evals.e.baseline'.*Did you mean 'baseline_examples'"),
])
def test_config_errors(changes, error):
  with pytest.raises(config_lib.ConfigError, match=error):
    config_lib.load(config_lib.ConfigDict(dict(total_steps=1, evals={"e": dict(
        type="cross_modal", **changes)})))


def test_config_defaults():
  config = config_lib.load(config_lib.ConfigDict(dict(total_steps=1, evals={"e": dict(
      type="cross_modal")})))
  ev = config.evals.e
  assert ev.predictions == (("depth", ("rgb",)), ("semseg", ("rgb",)),
                            ("rgb", ("depth", "semseg")))
  assert (ev.baseline_examples, ev.rgb_range, ev.split) == (1024, (-1.0, 1.0), "test")


class _PerfectMultiMAE(_FakeMultiMAE):
  def predict(self, params, batch, *, inputs, targets):
    return super().predict({"perfect": 1.0, "rgb": 0.0, "depth": 0.0, "semseg": 0}, batch,
                           inputs=inputs, targets=targets)


def test_evaluator_on_the_scenes_data(scenes_dir):
  """The real pipeline (multimodal_scenes test split, padded to 4 x 128) end to end."""
  config = config_lib.load(config_lib.ConfigDict(dict(total_steps=1, input=dict(
      data="multimodal_scenes", data_dir=scenes_dir, modalities=("rgb", "depth", "semseg"),
      pp_image="decode|value_range(-1,1)"), evals={"e": dict(
          type="cross_modal", batch_size=128, baseline_examples=256)})))
  out = _run(config, sharding.make_mesh(config.mesh), _PerfectMultiMAE(), {})
  for name in ("depth_from_rgb", "semseg_from_rgb", "rgb_from_depth_semseg"):
    assert out[f"eval/cm/{name}/num_examples"] == 500
  assert out["eval/cm/depth_from_rgb/abs_rel"] == 0 and out["eval/cm/semseg_from_rgb/miou"] == 1
  assert out["eval/cm/rgb_from_depth_semseg/psnr"] == pytest.approx(100.0)
  # The training mean is a weak but not absurd predictor (mostly background, far depth).
  assert 0.05 < out["eval/cm/depth_from_rgb/abs_rel_mean_baseline"] < 1
  assert 0.1 < out["eval/cm/semseg_from_rgb/miou_mean_baseline"] < 0.9
  assert out["eval/cm/semseg_from_rgb/pixel_acc_mean_baseline"] > 0.5
  assert 5 < out["eval/cm/rgb_from_depth_semseg/psnr_mean_baseline"] < 40
