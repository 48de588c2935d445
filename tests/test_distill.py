"""Teacher distillation (big_mm/objectives/distill.py), a SigLIP 2 part: the losses equal plain
references, the teacher is frozen and gets no gradient, a big_mm run and its HF export give the
same teacher, and a distilled student moves towards its teacher."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from big_mm import checkpoint, export, sharding, train, tree_paths
from big_mm import config as config_lib
from big_mm.objectives import distill
from conftest import final_params, tiny_config


def _reference_logit_loss(za, zb, ts, ya, yb, tt):
  """open_clip DistillClipLoss's distill term, written out with loops in numpy."""
  s, t = ts * za @ zb.T, tt * ya @ yb.T

  def ce(teacher, student):
    rows = []
    for i in range(len(teacher)):
      p = np.exp(teacher[i] - teacher[i].max())
      p /= p.sum()
      log_q = student[i] - student[i].max() - np.log(np.sum(np.exp(student[i] - student[i].max())))
      rows.append(-np.sum(p * log_q))
    return np.mean(rows)

  return 0.5 * (ce(t, s) + ce(t.T, s.T))


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_losses_equal_plain_references():
  rng = np.random.default_rng(0)
  za, zb, ya, yb = (_unit(rng.normal(size=(6, d))) for d in (4, 4, 5, 5))
  got = distill.logit_distill_loss(jnp.asarray(za), jnp.asarray(zb), 7.0, jnp.asarray(ya),
                                   jnp.asarray(yb), 12.0)
  np.testing.assert_allclose(got, _reference_logit_loss(za, zb, 7.0, ya, yb, 12.0), rtol=1e-5)
  # The same embeddings and scale: the cross-entropy is the softmax's entropy, not 0; the
  # gradient (KL) is 0 there.
  grad = jax.grad(lambda a: distill.logit_distill_loss(a, zb, 7.0, za, zb, 7.0))(jnp.asarray(za))
  np.testing.assert_allclose(grad, 0.0, atol=1e-6)
  s = {"image": za, "text": zb}
  t = {"image": _unit(za + 0.3 * rng.normal(size=za.shape)), "text": _unit(zb + 1.0)}
  want_cos = np.mean([np.mean(1 - np.sum(s[m] * t[m], -1)) for m in s])
  want_mse = np.mean([np.mean(np.sum((s[m] - t[m]) ** 2, -1)) for m in s])
  np.testing.assert_allclose(distill.feature_distill_loss(s, t, "cosine"), want_cos, rtol=1e-5)
  np.testing.assert_allclose(distill.feature_distill_loss(s, t, "mse"), want_mse, rtol=1e-5)


# HF SigLIP: the image embedding is the MAP output (no head), the text head maps to its width.
SIGLIP_DIMS = dict(image=0, text=32)


@pytest.fixture(scope="module")
def teacher_run(data_dir, tmp_path_factory):
  """A tiny towers run (the teacher) and its HF SigLIP export: (config, workdir, hf dir)."""
  workdir = str(tmp_path_factory.mktemp("teacher"))
  config = tiny_config(data_dir, total_steps=2, **{"model.out_dim": SIGLIP_DIMS})
  train.train(config, workdir)
  hf = str(tmp_path_factory.mktemp("teacher_hf") / "hf")
  export.export_hf(final_params(workdir, 2), config.model.to_dict(), hf, arch="siglip")
  return config, workdir, hf


def _student_config(data_dir, **objective):
  """The teacher's architecture (another init) as the student."""
  return tiny_config(data_dir, total_steps=3, **{"model.out_dim": SIGLIP_DIMS},
                     objective=dict(name="siglip2", **{"distill_weight": 1.0, **objective}))


def _batch(config, setup):
  from big_mm.input import pipeline
  it = pipeline.make_train_iterator(config.input, global_batch_size=16, seed=0,
                                    sharding=sharding.batch_sharding(setup.mesh))
  return next(it)


def test_workdir_and_hf_export_give_the_same_teacher(data_dir, teacher_run):
  _, workdir, hf = teacher_run
  teachers = {}
  for name, source in (("workdir", dict(distill_workdir=workdir)),
                       ("hf", dict(distill_path=hf))):
    setup = train.build(_student_config(data_dir, **source))
    part = next(p for p in setup.objective.parts if p.NAME == "distill")
    ts = train.make_train_state(setup)
    with train.use_mesh(setup):
      state = ts.init(jax.random.key(0))
      batch = _batch(setup.config, setup)
      inputs = {"image": batch["image"], "text": batch["text"]}
      z, out = jax.jit(part.teacher_forward)(state["extra"]["distill"], inputs)
    teachers[name] = (tree_paths.flat_dict(jax.device_get(state["extra"]["distill"])),
                      jax.device_get(z), float(out["t"]))
  (flat_w, z_w, t_w), (flat_h, z_h, t_h) = teachers["workdir"], teachers["hf"]
  saved = tree_paths.flat_dict(final_params(workdir, 2))
  assert set(flat_w) == set(saved)
  for k in saved:
    np.testing.assert_array_equal(flat_w[k], saved[k], err_msg=k)
  assert set(flat_h) == set(flat_w)
  for k in flat_w:
    np.testing.assert_allclose(flat_h[k], flat_w[k], rtol=1e-6, atol=1e-7, err_msg=k)
  for m in ("image", "text"):
    np.testing.assert_allclose(z_h[m], z_w[m], atol=1e-5)
  assert t_h == pytest.approx(t_w, rel=1e-6)


def test_teacher_is_frozen_and_gets_no_gradient(data_dir, teacher_run, tmp_path):
  _, teacher_dir, _ = teacher_run
  config = _student_config(data_dir, distill_workdir=teacher_dir)
  setup = train.build(config)
  ts = train.make_train_state(setup)
  with train.use_mesh(setup):
    state = ts.init(jax.random.key(0))
    batch = _batch(config, setup)
    grad_extra = jax.jit(jax.grad(lambda e: setup.objective.loss_fn(
        state["params"], batch, jax.random.key(1), extra=e, step=jnp.int32(0))[0]))(
            state["extra"])
  leaves = jax.tree.leaves(grad_extra["distill"])
  assert leaves and all(not np.any(np.asarray(g)) for g in leaves)
  # Trained 3 steps: the student changed, the checkpointed teacher is the teacher run's params.
  workdir = str(tmp_path / "student")
  train.train(config, workdir)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every_steps=1,
                                 read_only=True)
  saved, _ = ckpt.restore(3, ts.abstract)
  ckpt.close()
  saved = jax.device_get(saved)
  jax.tree.map(np.testing.assert_array_equal, saved["extra"]["distill"],
               final_params(teacher_dir, 2))
  assert not np.array_equal(saved["params"]["txt"]["head"]["kernel"],
                            jax.device_get(state["params"])["txt"]["head"]["kernel"])
  # Leaves shaped like the student's params (the same architecture) are sharded like them.
  assert ts.shardings["extra"]["distill"] == ts.shardings["params"]


@pytest.mark.parametrize("kind", ["logits", "features"])
def test_student_moves_towards_the_teacher(data_dir, teacher_run, kind):
  """Only the distillation loss (the contrastive term is there, but the distillation weight
  dominates): a few Adam steps lower it."""
  _, teacher_dir, _ = teacher_run
  config = _student_config(data_dir, distill_workdir=teacher_dir, distill_kind=kind,
                           distill_weight=100.0)
  setup = train.build(config)
  ts = train.make_train_state(setup)
  tx = optax.adam(3e-3)
  with train.use_mesh(setup):
    state = ts.init(jax.random.key(0))
    batch = _batch(config, setup)

    @jax.jit
    def step(params, opt, extra):
      (_, metrics), grads = setup.objective.value_and_grad(params, batch, jax.random.key(1),
                                                           extra=extra, step=jnp.int32(0))
      updates, opt = tx.update(grads, opt, params)
      # Logits: the KL (the cross-entropy less the teacher's entropy, its floor).
      return (optax.apply_updates(params, updates), opt,
              metrics["distill_kl" if kind == "logits" else "distill_loss"])

    params, opt = state["params"], tx.init(state["params"])
    losses = []
    for _ in range(8):
      params, opt, loss = step(params, opt, state["extra"])
      losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("changes,error", [
    (dict(distill_weight=1.0), r"needs the teacher: set objective.distill_workdir"),
    (dict(distill_weight=1.0, distill_workdir="/a", distill_path="/b"), r"one of them"),
    (dict(distill_kind="kl"), r"objective.distill_kind='kl' is not valid"),
    (dict(distill_weight=-1.0), r"objective.distill_weight must be >= 0"),
    (dict(distill_model=dict(out_dim=8)), r"objective.distill_model must be the teacher's"),
    (dict(distill_weight=1.0, distill_path="/b", distill_step=3), r"distill_path has no steps"),
])
def test_config_errors(changes, error):
  from big_mm.objectives import siglip2
  with pytest.raises(config_lib.ConfigError, match=error):
    siglip2.Siglip2.check_settings(dict(siglip2.Siglip2.SETTINGS, **changes))


def test_features_need_equal_dims(data_dir, teacher_run):
  _, teacher_dir, _ = teacher_run
  config = _student_config(data_dir, distill_workdir=teacher_dir, distill_kind="features")
  with config.unlocked():
    config.model.out_dim = dict(image=8, text=8)
  with pytest.raises(config_lib.ConfigError, match=r"\(student, teacher\) dims are"):
    train.build(config)


def test_benchmark_flops_count_the_teacher(data_dir, teacher_run):
  """tools/benchmark.py's model FLOPs (XLA's cost analysis of the train step) include the
  teacher's forward pass: the step with distillation costs the step without it plus at least
  the teacher's forward FLOPs (and a little more for the B x B logits)."""
  import sys
  from conftest import ROOT
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  import benchmark  # pylint: disable=g-import-not-at-top
  from big_mm import metrics
  _, teacher_dir, _ = teacher_run
  flops = {}
  for weight in (0.0, 1.0):
    config = _student_config(data_dir, distill_weight=weight,
                             distill_workdir=teacher_dir if weight else None)
    setup = train.build(config)
    batch = sharding.batch_sharding(setup.mesh)
    abstract = {"image": jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.float32, sharding=batch),
                "text": jax.ShapeDtypeStruct((16, 8), jnp.int32, sharding=batch)}
    flops[weight] = benchmark.model_flops(config, abstract)
  part = next(p for p in setup.objective.parts if p.NAME == "distill")
  with train.use_mesh(setup):
    teacher = metrics.compiled_flops(jax.jit(part.teacher_forward).lower(
        train.make_train_state(setup).abstract["extra"]["distill"], abstract))
  extra = flops[1.0] - flops[0.0]
  assert teacher > 0 and teacher <= extra < 1.05 * teacher, (flops, teacher)
