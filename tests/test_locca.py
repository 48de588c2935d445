"""LocCa as a SigLIP 2 part (big_mm/objectives/locca.py) and the referring evaluator
(big_mm/evaluators/referring.py): the task sequences, the loss against a plain numpy
reference from the decoder's logits, masked image tokens, 8-device sharding, the decoding
API, the IoU metrics and a short training run with both evaluators."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_mm import config as config_lib
from big_mm import sharding
from big_mm.evaluators import common, referring
from big_mm.models.decoder import shift_right
from big_mm.models.towers import Towers
from big_mm.objectives import Context, locca, siglip2

V, BINS, L, LR, B = 32, 16, 6, 4, 8
TOWERS = dict(
    image=dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=(4, 4), pool="map"),
    text=dict(width=16, depth=1, mlp_dim=32, num_heads=2, vocab_size=V))
DECODER = dict(width=16, depth=1, mlp_dim=32, num_heads=2)


def _mesh(n=1):
  return sharding.make_mesh(dict(data=-1), jax.devices()[:n])


def _objective(mesh, **settings):
  settings = dict(dict(locca_weight=2.0, locca_decoder=DECODER, locca_loc_bins=BINS,
                       locca_box_text_len=LR), **settings)
  model = Towers(towers=TOWERS, out_dim=8, temperature_init=10.0, bias_init=-5.0)
  ctx = Context(mesh=mesh, batch_size=B, text_len=L, image_size=(8, 8), total_steps=10)
  return siglip2.Siglip2(model, ctx, **settings)


def _batch(seed=0):
  """Each example has one present box, in a random one of its K=2 slots."""
  rng = np.random.default_rng(seed)
  lo = rng.uniform(0, 0.5, (B, 2))
  box = np.concatenate([lo, lo + rng.uniform(0.1, 0.5, (B, 2))], -1).astype(np.float32)
  expr = np.concatenate([rng.integers(2, V, (B, LR - 1)), np.ones((B, 1))], -1)
  slot = rng.integers(0, 2, B)
  boxes, box_text = np.zeros((B, 2, 4), np.float32), np.zeros((B, 2, LR), np.int32)
  boxes[np.arange(B), slot], box_text[np.arange(B), slot] = box, expr
  text = np.concatenate([rng.integers(2, V, (B, L - 2)), np.ones((B, 1)), np.zeros((B, 1))], -1)
  return {"image": rng.normal(size=(B, 8, 8, 3)).astype(np.float32),
          "text": text.astype(np.int32), "boxes": boxes, "box_text": box_text}, box, expr


def _init(obj):
  # Jitted: eager init compiles each op on its own.
  return nn.unbox(jax.jit(obj.init_params)(jax.random.key(0)))


def test_sequences_and_coordinate_round_trip():
  vocab = locca.Vocab(text=V, bins=BINS)
  cap, ref, grd = (vocab.task_token(t) for t in locca.TASKS)
  assert (cap, ref, grd, vocab.size) == (V + BINS, V + BINS + 1, V + BINS + 2, V + BINS + 3)
  text = jnp.array([[5, 6, 1, 0]] * 3)
  boxes = jnp.array([[[0.0, 0.0, 0.0, 0.0], [0.1, 0.26, 0.5, 0.99]]] * 3)
  box_text = jnp.array([[[0, 0, 0], [7, 8, 1]]] * 3)
  prefix, targets = locca.build_sequences(vocab, text, boxes, box_text, jnp.array([0, 1, 2]),
                                          jnp.array([1, 1, 1]), prefix_len=5, target_len=6)
  locs = [V + 1, V + 4, V + 8, V + 15]  # floor(c * 16)
  np.testing.assert_array_equal(prefix, [[cap, 0, 0, 0, 0], [ref, 7, 8, 1, 0], [grd] + locs])
  np.testing.assert_array_equal(targets, [[5, 6, 1, 0, 0, 0], locs + [1, 0], [7, 8, 1, 0, 0, 0]])
  coords = jax.random.uniform(jax.random.key(0), (1000,))
  back = locca.dequantize(locca.quantize(coords, BINS), BINS)
  assert np.max(np.abs(back - coords)) <= 0.5 / BINS + 1e-6
  with pytest.raises(ValueError, match="locca_box_text_len"):
    locca.build_sequences(vocab, text, boxes, box_text, jnp.array([0, 1, 2]),
                          jnp.array([1, 1, 1]), prefix_len=3, target_len=6)


def test_sample_tasks_picks_present_boxes_and_captions_examples_without():
  box_text = jnp.zeros((400, 3, 2), jnp.int32).at[:300, 1].set(5).at[:150, 2].set(7)
  task, index = locca.sample_tasks(jax.random.key(3), (0.2, 0.4, 0.4), box_text)
  task, index = np.asarray(task), np.asarray(index)
  assert (task[300:] == 0).all()  # no box: caption
  assert set(index[:150]) == {1, 2} and set(index[150:300]) == {1}
  assert 0.1 < np.mean(task[:300] == 0) < 0.3 and 0.3 < np.mean(task[:300] == 1) < 0.5


def _reference_loss(obj, params, batch, box, expr, task):
  """Plain numpy: the task's sequences written out, the decoder's logits, mean target CE."""
  part = obj.parts[0]
  vocab_task = V + BINS + locca.TASKS.index(task)
  locs = V + np.clip(np.floor(box * BINS), 0, BINS - 1).astype(np.int32)
  prefix = np.zeros((B, part.prefix_len), np.int32)
  targets = np.zeros((B, part.target_len), np.int32)
  prefix[:, 0] = vocab_task
  if task == "caption":
    targets[:, :L] = batch["text"]
  elif task == "ref":
    prefix[:, 1:1 + LR] = expr
    targets[:, :4], targets[:, 4] = locs, 1
  else:
    prefix[:, 1:5] = locs
    targets[:, :LR] = expr
  _, out = obj.model.apply({"params": obj._towers_params(params)}, {"image": batch["image"]})
  inputs = np.concatenate([np.zeros((B, 1), np.int32), targets[:, :-1]], 1)
  logits, _ = part.decoder.apply({"params": params["dec"]}, inputs, out["img/encoded"],
                                 prefix_tokens=prefix)
  logits = np.asarray(logits, np.float64)
  logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                keepdims=True)) - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  return np.sum(nll * (targets != 0)) / np.sum(targets != 0)


@pytest.mark.parametrize("task", locca.TASKS)
def test_loss_equals_numpy_reference(task):
  mesh = _mesh()
  probs = tuple(float(t == task) for t in locca.TASKS)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(())):
    obj = _objective(mesh, locca_task_probs=probs)
    params = _init(obj)
    batch, box, expr = _batch()
    loss, metrics = jax.jit(obj.loss_fn)(params, batch, jax.random.key(1), step=np.int32(0))
    want = _reference_loss(obj, params, batch, box, expr, task)
  np.testing.assert_allclose(metrics["locca/loss"], want, rtol=1e-5)
  np.testing.assert_allclose(loss, metrics["contrastive_loss"] + 2.0 * want, rtol=1e-5)
  assert metrics[f"locca/{task}_fraction"] == 1.0
  np.testing.assert_allclose(metrics[f"locca/{task}_nll"], want, rtol=1e-5)


def test_masked_image_tokens_change_nothing():
  mesh = _mesh()
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(())):
    obj = _objective(mesh)
    part = obj.parts[0]
    params = _init(obj)
    batch, _, _ = _batch()
    rng = np.random.default_rng(1)
    tokens = rng.normal(size=(B, 5, 16)).astype(np.float32)
    mask = np.ones((B, 5), bool)
    mask[:, 3:] = False
    other = tokens.copy()
    other[:, 3:] = rng.normal(size=(B, 2, 16)) * 10

    @jax.jit
    def loss(tokens, mask):
      fwd = {"out": {"img/encoded": tokens, "img/token_mask": mask}}
      return part.loss(params, batch, jax.random.key(2), fwd, extra=None, step=0)[0]

    @jax.jit
    def boxes(tokens, mask):
      enc = {"tokens": tokens, "mask": mask, "prefix": locca.ref_prefix(
          part.vocab, jnp.asarray(batch["box_text"][:, 0]))}
      cache = part.init_cache(params, enc, 4)
      return part._step_logits(params, enc, cache, jnp.zeros((B,), jnp.int32), 0)[0]

    np.testing.assert_allclose(loss(tokens, mask), loss(other, mask), rtol=1e-6)
    np.testing.assert_allclose(boxes(tokens, mask), boxes(other, mask), rtol=1e-5, atol=1e-6)
    # Without the mask the changed tokens do count: the test can fail.
    everything = np.ones_like(mask)
    assert not np.isclose(loss(tokens, everything), loss(other, everything), rtol=1e-4)


def test_naflex_padding_patches_change_nothing():
  """End to end on NaFlex batches: the padded patches reach the decoder as masked tokens."""
  mesh = _mesh()
  model = Towers(towers=TOWERS, out_dim=8, temperature_init=10.0, bias_init=-5.0)
  ctx = Context(mesh=mesh, batch_size=B, text_len=L, image_patches=(6, 4), total_steps=10)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(())):
    obj = siglip2.Siglip2(model, ctx, locca_weight=1.0, locca_decoder=DECODER,
                          locca_loc_bins=BINS, locca_box_text_len=LR)
    params = _init(obj)
    batch, _, _ = _batch()
    rng = np.random.default_rng(2)
    patches = rng.normal(size=(B, 6, 48)).astype(np.float32)
    batch.update(image=patches, image_mask=np.arange(6)[None].repeat(B, 0) < 4,
                 image_shape=np.full((B, 2), 2, np.int32))
    other = dict(batch, image=np.where(batch["image_mask"][..., None], patches, 7.0))
    loss_fn, boxes_fn = jax.jit(obj.loss_fn), jax.jit(obj.predict_boxes)
    metrics = [loss_fn(params, b, jax.random.key(1), step=np.int32(0))[1] for b in (batch, other)]
    np.testing.assert_allclose(metrics[0]["locca/loss"], metrics[1]["locca/loss"], rtol=1e-6)
    images = [{"x": b["image"], "mask": b["image_mask"], "shape": b["image_shape"]}
              for b in (batch, other)]
    np.testing.assert_array_equal(boxes_fn(params, images[0], batch["box_text"][:, 0]),
                                  boxes_fn(params, images[1], batch["box_text"][:, 0]))


def test_sharded_equals_single_device():
  batch, _, _ = _batch(seed=4)
  results = []
  for n in (1, 8):
    mesh = _mesh(n)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(())):
      obj = _objective(mesh)
      params = _init(obj)
      sharded = jax.device_put(batch, sharding.batch_sharding(mesh))
      (loss, metrics), grads = jax.jit(obj.value_and_grad)(params, sharded, jax.random.key(5),
                                                           step=np.int32(0))
      results.append(jax.device_get((loss, metrics["locca/loss"], grads)))
  (loss1, locca1, grads1), (loss8, locca8, grads8) = results
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  np.testing.assert_allclose(locca8, locca1, rtol=1e-5)
  assert np.abs(grads1["dec"]["head"]["kernel"]).sum() > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads8,
               grads1)


def test_decoding_api():
  from big_mm import decoding
  mesh = _mesh()
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(())):
    obj = _objective(mesh)
    part = obj.parts[0]
    params = _init(obj)
    batch, _, _ = _batch()
    images, text = batch["image"], batch["text"]
    # The cached steps give the teacher-forced log-likelihood of the caption task.
    sum_logp, count = jax.jit(obj.log_likelihood)(params, images, text)
    enc = obj.encode(params, images)
    cache = obj.init_cache(params, enc, L)
    total = np.zeros(B)
    for pos, token in enumerate(np.asarray(shift_right(text)).T):
      logits, cache = part._step_logits(params, enc, cache, jnp.asarray(token), pos)
      logp = np.asarray(jax.nn.log_softmax(logits))
      total += np.where(text[:, pos] != 0, logp[np.arange(B), text[:, pos]], 0.0)
    np.testing.assert_allclose(sum_logp, total, rtol=1e-4)
    np.testing.assert_array_equal(count, np.sum(text != 0, 1))
    captions = np.asarray(decoding.greedy(obj, params, images, max_len=L))
    assert captions.max() < V  # decode_step generates tokenizer pieces only
    got = np.asarray(jax.jit(obj.predict_boxes)(params, images, batch["box_text"][:, 0]))
    assert got.shape == (B, 4) and (got > 0).all() and (got < 1).all()
    # Bin centres: every coordinate is (i + 0.5) / BINS.
    np.testing.assert_allclose((got * BINS - 0.5) % 1, 0, atol=1e-5)
    expressions = np.asarray(obj.predict_expressions(params, images, batch["boxes"][:, 0]))
    assert expressions.shape == (B, LR) and expressions.max() < V


def test_one_batch_is_learned_and_decoded_back():
  """Training and decoding build the same sequences: fitted to one batch (ref and grounded
  tasks), predict_boxes gives its boxes' bin centres and predict_expressions its expressions."""
  import optax
  mesh = _mesh()
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(())):
    obj = _objective(mesh, locca_task_probs=(0.0, 0.5, 0.5))
    params = _init(obj)
    batch, box, expr = _batch()
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt, i):
      (_, metrics), grads = obj.value_and_grad(params, batch, jax.random.fold_in(
          jax.random.key(0), i), step=i)
      updates, opt = tx.update(grads, opt, params)
      return optax.apply_updates(params, updates), opt, metrics["locca/nll"]

    opt = tx.init(params)
    for i in range(300):
      params, opt, nll = step(params, opt, i)
    assert nll < 0.1
    slot = np.argmax(np.any(batch["box_text"] != 0, -1), 1)
    got = obj.predict_boxes(params, batch["image"], batch["box_text"][np.arange(B), slot])
    np.testing.assert_allclose(got, locca.dequantize(locca.quantize(box, BINS), BINS), atol=1e-6)
    np.testing.assert_array_equal(obj.predict_expressions(params, batch["image"], box), expr)


def test_box_metrics_on_hand_made_boxes():
  true = np.array([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.4, 0.4],
                   [0.0, 0.0, 1.0, 1.0]])
  pred = np.array([[0.0, 0.0, 0.5, 0.5],      # identical: 1
                   [0.0, 0.25, 0.5, 0.75],    # half overlap: 0.125 / 0.375 = 1/3
                   [0.5, 0.5, 0.7, 0.7],      # disjoint: 0
                   [0.0, 0.0, 1.0, 0.5]])     # inside, half the area: 0.5
  np.testing.assert_allclose(referring.box_iou(pred, true), [1.0, 1 / 3, 0.0, 0.5])
  metrics = referring.box_metrics(pred, true)
  assert metrics["accuracy"] == 0.5  # IoU >= 0.5: the first and the last
  np.testing.assert_allclose(metrics["mean_iou"], (1 + 1 / 3 + 0 + 0.5) / 4)
  assert referring.box_iou(np.zeros((1, 4)), np.zeros((1, 4)))[0] == 0.0
  assert referring.until_eos([5, 6, 1, 7, 0]) == (5, 6)


def test_referring_refuses_objectives_without_locca(data_dir):
  from conftest import tiny_config
  config = tiny_config(data_dir, objective=dict(name="siglip2"))
  mesh = _mesh()
  obj = _objective(mesh, locca_weight=0.0)
  assert not hasattr(obj, "predict_boxes")
  ev = config_lib.ConfigDict(dict(referring.Referring.DEFAULTS, type="referring"))
  with pytest.raises(config_lib.ConfigError, match="locca_weight > 0"):
    referring.Referring("ref", ev, common.EvalContext(config, mesh, obj))


def test_bad_settings_name_the_key():
  mesh = _mesh()
  with pytest.raises(config_lib.ConfigError, match="locca_decoder.vocab_size is set by"):
    _objective(mesh, locca_decoder=dict(DECODER, vocab_size=10))
  with pytest.raises(config_lib.ConfigError, match="locca_decoder.widht is not a Decoder"):
    _objective(mesh, locca_decoder=dict(widht=16))
  with pytest.raises(config_lib.ConfigError, match="locca_task_probs"):
    _objective(mesh, locca_task_probs=(0, 0, 0))
  with pytest.raises(config_lib.ConfigError, match="locca_loc_bins"):
    _objective(mesh, locca_loc_bins=0)


def test_trains_with_referring_and_captioning_evaluators(tmp_path, boxes_dir):
  from big_mm import train
  from conftest import ROOT, read_metrics, tiny_config
  import os
  evals = dict(
      ref=dict(type="referring", split="test[:16]", batch_size=16),
      cap=dict(type="captioning", split="test[:16]", batch_size=16, max_examples=16))
  config = tiny_config(
      boxes_dir, total_steps=2,
      objective=dict(name="siglip2", locca_weight=1.0, locca_loc_bins=32,
                     locca_decoder=dict(width=32, depth=1, mlp_dim=64, num_heads=2)),
      **{"input.data": "digits_boxes",
         "input.tokenizer": os.path.join(ROOT, "data", "digits_boxes_spm.model"),
         "input.pp_image": "decode|resize(32)|value_range(-1,1)",
         "input.box_column": "boxes", "input.box_text_column": "box_texts",
         "input.max_boxes": 3, "input.box_text_len": 8, "evals": evals})
  train.train(config, str(tmp_path))
  rows = read_metrics(str(tmp_path))
  losses = [r["locca/loss"] for r in rows if "locca/loss" in r]
  assert len(losses) == 2 and all(np.isfinite(losses))
  final = {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}
  assert 0.0 <= final["eval/ref/accuracy"] <= 1.0 and 0.0 <= final["eval/ref/mean_iou"] <= 1.0
  assert final["eval/ref/num_pairs"] >= 32  # 16 canvases of 2-3 digits
  assert 0.0 <= final["eval/ref/grounded_exact_match"] <= 1.0
  assert np.isfinite(final["eval/cap/perplexity"]) and final["eval/cap/num_decoded"] == 16
