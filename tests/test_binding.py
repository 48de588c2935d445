"""The binding objective (big_mm/objectives/binding.py): pairwise and higher-order losses over
the towers of several modalities, presence masks, sharding, frozen towers, config errors."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from big_mm import config as config_lib
from big_mm import train
from big_mm.objectives import higher_order, losses
from conftest import train_steps

VECS = ("vec_a", "vec_b", "vec_c")
DIM = 6


def _jsonl(tmp_path) -> str:
  rng = np.random.default_rng(0)
  path = tmp_path / "vecs.jsonl"
  with open(path, "w") as f:
    for _ in range(64):
      f.write(json.dumps({m: rng.normal(size=DIM).round(3).tolist() for m in VECS}) + "\n")
  return f"jsonl:{path}"


def _config(data, objective, **changes):
  user = ml_collections.ConfigDict(dict(
      seed=0, batch_size=16, total_steps=3, log_every_steps=1,
      input=dict(data=data, modalities=VECS, num_workers=0,
                 pp_modalities={m: f"vector({DIM})" for m in VECS}),
      model_name="towers",
      model=dict(towers={m: dict(width=8, depth=1) for m in VECS}, out_dim=4,
                 temperature_init=2.0, bias_init=-1.0),
      objective=dict(name="binding", **objective),
      optim=dict(lr=1e-2, eps=1e-6, schedule=dict(name="constant", warmup_steps=0)),
      evals={}, checkpoint=dict(every_steps=100, keep=1), mesh=dict(data=-1, fsdp=1)))
  for key, value in changes.items():
    node = user
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config_lib.load(user)


def _batch(n=16, seed=1, missing=True):
  rng = np.random.default_rng(seed)
  batch = {m: rng.normal(size=(n, DIM)).astype(np.float32) for m in VECS}
  for i, m in enumerate(VECS):
    present = np.ones(n, np.int32)
    if missing:
      present[i::4] = 0  # Each modality absent from its own quarter of the rows.
    if missing and m == "vec_c":
      present[8:] = 0  # Devices 4..7 of 8 (2 rows each) have no vec_c at all.
    batch[f"{m}_present"] = present
  return batch


PAIRS = (("vec_a", "vec_b", 1.0), ("vec_b", "vec_c", 0.5))


def _embeddings(setup, params, batch):
  z, out = setup.model.apply({"params": params}, {m: batch[m] for m in VECS})
  return z, out


def test_pairwise_loss_is_the_weighted_masked_pair_losses(tmp_path):
  """loss = sum_k w_k * contrastive_loss(z_a, z_b, valid = a_present * b_present); metrics give
  each pair's loss and rows and each modality's missing rows."""
  config = _config(_jsonl(tmp_path), dict(pairs=PAIRS, loss="sigmoid", strategy="local"))
  setup = train.build(config, devices=jax.devices()[:1])
  params = jax.device_get(train.make_train_state(setup).init(jax.random.key(0))["params"])
  batch = _batch()
  loss, metrics = setup.objective.loss_fn(params, batch, jax.random.key(1))
  z, out = _embeddings(setup, params, batch)
  want = 0.0
  for a, b, w in PAIRS:
    valid = batch[f"{a}_present"] * batch[f"{b}_present"]
    pair = losses.sigmoid_loss(z[a][valid == 1], z[b][valid == 1], out["t"], out["b"]) * (
        valid.sum() / valid.sum())  # the sub-batch of rows with both: n_valid normalisation
    np.testing.assert_allclose(metrics[f"binding/{a}_{b}/loss"], pair, rtol=1e-5)
    assert metrics[f"binding/{a}_{b}/rows"] == valid.sum()
    want += w * pair
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  for m in VECS:
    assert metrics[f"missing/{m}"] == 16 - batch[f"{m}_present"].sum()


def test_absent_rows_change_nothing(tmp_path):
  """The values of an absent modality's rows reach neither the loss nor the gradients."""
  for objective in (dict(pairs=PAIRS, loss="softmax"),
                    dict(pairs=(), higher_order="symile", higher_order_modalities=VECS),
                    dict(pairs=PAIRS[:1], higher_order="gram", higher_order_modalities=VECS,
                         gram_anchor="vec_b")):
    config = _config(_jsonl(tmp_path), dict(objective, strategy="local"))
    setup = train.build(config, devices=jax.devices()[:1])
    params = jax.device_get(train.make_train_state(setup).init(jax.random.key(0))["params"])
    batch = _batch()
    changed = dict(batch)
    for m in VECS:
      noise = np.random.default_rng(7).normal(size=batch[m].shape).astype(np.float32)
      changed[m] = np.where(batch[f"{m}_present"][:, None] == 1, batch[m], 100 * noise)
    loss_and_grad = jax.jit(jax.value_and_grad(
        lambda p, b: setup.objective.loss_fn(p, b, jax.random.key(1))[0]))
    (loss, grads), (changed_loss, changed_grads) = (loss_and_grad(params, batch),
                                                    loss_and_grad(params, changed))
    np.testing.assert_allclose(loss, changed_loss, rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
                 grads, changed_grads)


def test_higher_order_losses_are_the_references(tmp_path):
  """symile / gram objectives give higher_order's losses of the embeddings (rows with all
  modalities present), plus the pairs' losses."""
  batch = _batch()
  valid = np.prod([batch[f"{m}_present"] for m in VECS], axis=0)
  for kind in ("symile", "gram"):
    config = _config(_jsonl(tmp_path), dict(pairs=PAIRS[:1], higher_order=kind,
                                            higher_order_modalities=VECS, gram_anchor="vec_c",
                                            higher_order_weight=0.3, strategy="local"))
    setup = train.build(config, devices=jax.devices()[:1])
    params = jax.device_get(train.make_train_state(setup).init(jax.random.key(0))["params"])
    rng = jax.random.key(3)
    loss, metrics = setup.objective.loss_fn(params, batch, rng)
    z, out = _embeddings(setup, params, batch)
    zs = [z[m] for m in VECS]
    if kind == "symile":
      want = higher_order.symile_loss(zs, out["t"], negatives="n",
                                      rng=jax.random.split(rng)[1], valid=valid)
    else:
      want = higher_order.gram_loss(zs, out["t"], anchor=2, valid=valid)
    np.testing.assert_allclose(metrics[f"binding/{kind}/loss"], want, rtol=1e-5)
    assert metrics[f"binding/{kind}/rows"] == valid.sum()
    np.testing.assert_allclose(loss, metrics["binding/vec_a_vec_b/loss"] + 0.3 * want, rtol=1e-5)


def test_sharded_steps_equal_one_device(tmp_path):
  """Three steps on 8 devices (data 4 x fsdp 2) equal 1 device: losses, metrics, params, with
  rows missing on every device and a device without vec_c (masked pairs and Symile; every
  strategy of the masked pair losses: tests/test_contrastive.py). Sigmoid: softmax's bias has
  an exactly-zero true gradient whose float noise Adam would turn into updates that differ
  between layouts."""
  objective = dict(pairs=PAIRS, loss="sigmoid", strategy="all_gather", higher_order="symile",
                   higher_order_modalities=VECS)
  config = _config(_jsonl(tmp_path), objective)
  batches = [_batch(seed=s) for s in range(3)]
  _, one, p1, _ = train_steps(config, jax.devices()[:1], batches)
  sharded = _config(_jsonl(tmp_path), objective, **{"mesh.data": 4, "mesh.fsdp": 2})
  _, eight, p8, _ = train_steps(sharded, jax.devices()[:8], batches)
  for m1, m8 in zip(one, eight):
    for key in m1:
      np.testing.assert_allclose(m8[key], m1[key], rtol=2e-5, atol=1e-6, err_msg=key)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), p1, p8)


def test_frozen_tower_is_not_trained(tmp_path):
  """LanguageBind: the anchor tower frozen by optim.lr_mults stays as it was."""
  config = _config(_jsonl(tmp_path), dict(pairs=PAIRS, loss="sigmoid"),
                   **{"optim.lr_mults": (("vec_b/.*", 0.0), (".*", 1.0))})
  setup = train.build(config, devices=jax.devices()[:1])
  init = jax.device_get(train.make_train_state(setup).init(jax.random.key(0))["params"])
  _, _, params, _ = train_steps(config, jax.devices()[:1], [_batch(seed=s) for s in range(2)])
  jax.tree.map(np.testing.assert_array_equal, params["vec_b"], init["vec_b"])
  assert not np.allclose(params["vec_a"]["head"]["kernel"], init["vec_a"]["head"]["kernel"])


def test_config_errors(tmp_path):
  data = _jsonl(tmp_path)
  cases = [
      (dict(pairs=(("vec_a", "vec_a", 1.0),)), r"two different modalities"),
      (dict(pairs=("vec_a", "vec_b")), r"objective.pairs must be \(\(modality_a"),
      (dict(pairs=(("vec_a", "vec_b", -1.0),)), r"weight >= 0"),
      (dict(pairs=()), r"nothing to train"),
      (dict(pairs=(), higher_order="symile"), r"higher_order_modalities=\(\): name at least two"),
      (dict(higher_order="gram", pairs=PAIRS, gram_anchor="image"), r"gram_anchor='image' must "
                                                                    r"be one of"),
      (dict(higher_order="symile", pairs=PAIRS, strategy="ring"), r"'ring' runs the pairwise"),
      (dict(pairs=(("vec_a", "audio", 1.0),)), r"use \['audio'\], which the model has no tower"),
  ]
  for objective, message in cases:
    with pytest.raises(config_lib.ConfigError, match=message):
      train.build(_config(data, objective), devices=jax.devices()[:1])
  with pytest.raises(config_lib.ConfigError, match=r"input.modalities=.* does not list"):
    train.build(_config(data, dict(pairs=PAIRS), **{
        "input.modalities": ("vec_a", "vec_b"),
        "input.pp_modalities": {"vec_a": "vector(6)", "vec_b": "vector(6)"}}),
        devices=jax.devices()[:1])
