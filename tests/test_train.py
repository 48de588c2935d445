"""The trainer end to end: sharded layouts equal one device, LiT, bad input (kills and
resume: tests/reliability)."""

import jax
import numpy as np
import pytest

from big_mm import config as config_lib
from big_mm import sharding, train
from big_mm.input import pipeline
from conftest import final_params, tiny_config, train_steps


def run_steps(config, devices, batches):
  """conftest.train_steps -> (each step's loss, the final params, their shardings)."""
  _, metrics, params, shardings = train_steps(config, devices, batches)
  return [float(m["loss"]) for m in metrics], params, shardings


@pytest.fixture(scope="module")
def host_batches(data_dir):
  config = tiny_config(data_dir)
  it = pipeline.make_train_iterator(config.input, global_batch_size=16, seed=0, sharding=None)
  return [{k: v for k, v in next(it).items() if k in ("image", "text")} for _ in range(3)]


@pytest.fixture(scope="module")
def single_device_run(data_dir, host_batches):
  config = tiny_config(data_dir, mesh=dict(data=1, fsdp=1, tensor=1))
  return run_steps(config, jax.devices()[:1], host_batches)


@pytest.mark.parametrize("mesh,loss,strategy", [
    (dict(data=8, fsdp=1, tensor=1), "sigmoid", "all_gather"),   # DP
    (dict(data=1, fsdp=8, tensor=1), "sigmoid", "ring"),         # FSDP
    (dict(data=1, fsdp=4, tensor=2), "sigmoid", "ring"),         # FSDP x TP
])
def test_sharded_layouts_match_one_device(data_dir, host_batches, single_device_run,
                                          mesh, loss, strategy):
  ref_losses, ref_params, _ = single_device_run
  config = tiny_config(data_dir, mesh=mesh, **{"objective.loss": loss,
                                                "objective.strategy": strategy})
  losses, params, shardings = run_steps(config, jax.devices(), host_batches)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  assert losses[-1] != losses[0]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               params, ref_params)
  # The layout is really the one asked for (not silently replicated).
  spec = shardings["txt"]["Encoder_0"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"].spec
  assert set(spec) - {None} == {a for a in ("fsdp", "tensor") if mesh[a] > 1}


def test_gradcache_micro_batches_train_like_one_device(data_dir, host_batches, single_device_run,
                                                      monkeypatch):
  """objective.micro_batches=2 (GradCache, full-batch negatives) trains exactly like the whole
  batch at once, and the trainer's step takes the objective's value_and_grad."""
  from big_mm.objectives import Contrastive
  traced = []
  gradcache = Contrastive.value_and_grad

  def recording(self, *args):
    traced.append(self.micro_batches)
    return gradcache(self, *args)

  monkeypatch.setattr(Contrastive, "value_and_grad", recording)
  ref_losses, ref_params, _ = single_device_run
  config = tiny_config(data_dir, mesh=dict(data=8, fsdp=1, tensor=1),
                       **{"objective.micro_batches": 2})
  losses, params, _ = run_steps(config, jax.devices(), host_batches)
  assert traced == [2]  # traced once, by the jitted step
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               params, ref_params)


def test_pallas_kernels_from_config_train_like_xla(data_dir, host_batches, single_device_run,
                                                   monkeypatch):
  """Pallas attention (both towers) and the fused ring loss, chosen in the config, train
  like the jnp reference (CPU interpret mode)."""
  from big_mm.kernels import contrastive as contrastive_kernels
  from big_mm.kernels import flash_attention
  traced = []
  for module, name in ((flash_attention, "flash_attention"),
                       (contrastive_kernels, "sigmoid_sum_fwd")):
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k: (
        traced.append(_n), _f(*a, **k))[1])
  ref_losses, _, _ = single_device_run
  config = tiny_config(data_dir, mesh=dict(data=8, fsdp=1, tensor=1), **{
      "model.towers.image.attn_implementation": "pallas",
      "model.towers.text.attn_implementation": "pallas",
      "objective.implementation": "pallas", "objective.strategy": "ring"})
  losses, _, _ = run_steps(config, jax.devices(), host_batches)
  assert {"flash_attention", "sigmoid_sum_fwd"} <= set(traced)  # the kernels really ran
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)


def test_chunked_loss_from_config_trains_like_xla(data_dir, host_batches, single_device_run,
                                                  monkeypatch):
  """objective.implementation="chunked" (all_gather over 8 devices) trains like the jnp loss
  and really runs the chunked blocks."""
  from big_mm.kernels import contrastive as contrastive_kernels
  traced = []
  original = contrastive_kernels._chunked_sigmoid_sum
  monkeypatch.setattr(contrastive_kernels, "_chunked_sigmoid_sum",
                      lambda *a, **k: (traced.append(1), original(*a, **k))[1])
  ref_losses, _, _ = single_device_run
  config = tiny_config(data_dir, mesh=dict(data=8, fsdp=1, tensor=1), **{
      "objective.implementation": "chunked", "objective.strategy": "all_gather"})
  losses, _, _ = run_steps(config, jax.devices(), host_batches)
  assert traced
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)


def test_softmax_loss_trains_sharded(data_dir, host_batches):
  single = tiny_config(data_dir, mesh=dict(data=1, fsdp=1, tensor=1),
                       **{"objective.loss": "softmax", "model.bias_init": None})
  sharded = tiny_config(data_dir, mesh=dict(data=2, fsdp=4, tensor=1),
                        **{"objective.loss": "softmax", "objective.strategy": "ring",
                           "model.bias_init": None})
  ref, _, _ = run_steps(single, jax.devices()[:1], host_batches)
  got, _, _ = run_steps(sharded, jax.devices(), host_batches)
  np.testing.assert_allclose(got, ref, rtol=2e-5)


def test_params_are_built_from_the_objectives_example_batch(data_dir, host_batches):
  """The objective's example batch has the pipeline's keys, shapes and dtypes (it comes from
  the config: pp_image's size, text_len), so no batch is read to build the params."""
  setup = train.build(tiny_config(data_dir))
  example = setup.objective.example_batch()
  assert set(example) == set(host_batches[0])
  for key, spec in example.items():
    assert spec.shape == (1,) + host_batches[0][key].shape[1:], key
    assert spec.dtype == host_batches[0][key].dtype, key
  with pytest.raises(config_lib.ConfigError, match=r"input.pp_image leaves images at the size"):
    train.make_train_state(train.build(tiny_config(
        data_dir, **{"input.pp_image": "decode|value_range(-1,1)"})))


def test_fresh_and_resumed_runs_read_only_the_batches_they_train_on(data_dir, tmp_path,
                                                                    monkeypatch):
  """The trainer draws batch n for step n: none before the first step to learn shapes (on a
  resume such a batch was drawn, then thrown away by restoring the iterator's state)."""
  drawn = []
  real = pipeline.make_train_iterator

  def counting(*args, **kwargs):
    it = real(*args, **kwargs)

    class Counting(type(it)):
      def __next__(self):
        drawn.append(1)
        return super().__next__()

    it.__class__ = Counting
    return it

  monkeypatch.setattr(pipeline, "make_train_iterator", counting)
  workdir = str(tmp_path / "run")
  train.train(tiny_config(data_dir, total_steps=2), workdir)
  assert len(drawn) == 2
  drawn.clear()
  train.train(tiny_config(data_dir, total_steps=4), workdir)  # resumes at step 2
  assert len(drawn) == 2


def test_lit_loads_and_freezes_image_tower(data_dir, tmp_path):
  pretrained = str(tmp_path / "pretrained")
  train.train(tiny_config(data_dir, total_steps=2), pretrained)
  lit = tiny_config(data_dir, total_steps=3, **{
      "optim.lr_mults": ((r"img/.*", 0.0), (r".*", 1.0)),
      "init.workdir": pretrained, "init.include": r"img/.*",
      "objective.loss": "softmax", "model.bias_init": None})
  workdir = str(tmp_path / "lit")
  train.train(lit, workdir)
  before = final_params(pretrained, 2)
  after = final_params(workdir, 3)
  jax.tree.map(np.testing.assert_array_equal, after["img"], before["img"])
  assert not np.array_equal(after["txt"]["Embed_0"]["embedding"],
                            before["txt"]["Embed_0"]["embedding"])


def test_bad_inputs_fail_fast_with_helpful_messages(data_dir, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(OSError, match="cannot be created or written"):
    train.train(tiny_config(data_dir), str(blocker / "workdir"))
  with pytest.raises(sharding.ShardingError, match="batch_size=12 does not divide"):
    train.build(tiny_config(data_dir, batch_size=12))
  with pytest.raises(config_lib.ConfigError, match="vocab_size=99 but the tokenizer"):
    train.build(tiny_config(data_dir, **{"model.towers.text.vocab_size": 99}))
  with pytest.raises(FileNotFoundError, match="build_demo.py"):
    train.train(tiny_config(str(tmp_path / "empty")), str(tmp_path / "w"))


def test_evals_run_after_the_save_and_every_steps_0_disables(data_dir, tmp_path, monkeypatch):
  """A failing evaluator never costs the training it evaluates; every_steps=0 never runs."""
  called = []

  def failing_build(name, ev, context):
    def evaluate(params):
      called.append(name)
      raise RuntimeError("evaluator broke")
    return evaluate

  monkeypatch.setattr(train.evaluators, "build", failing_build)
  evals = {"zeroshot": dict(type="zeroshot", every_steps=0, classnames=("a",)),
           "retrieval": dict(type="retrieval")}
  workdir = str(tmp_path / "run")
  with pytest.raises(RuntimeError, match="evaluator broke"):
    train.train(tiny_config(data_dir, total_steps=2, evals=evals), workdir)
  assert called == ["retrieval"]
  assert final_params(workdir, 2)  # the last step was saved before the evaluator ran
