"""CM3 objective (big_mm/objectives/cm3.py): documents, causal masking, training, sharding."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_mm import config as config_lib
from big_mm.objectives import base, cm3

from conftest import ROOT, TOKENIZER, train_steps

SPM_VOCAB = 128  # data/digits_spm.model
CODES, N, TEXT_LEN, SPANS = 16, 4, 6, 3
VOCAB = cm3.DocumentVocab(SPM_VOCAB, CODES, SPANS)


def _batch(b, seed, text_len=TEXT_LEN, n=N):
  rng = np.random.default_rng(seed)
  text = np.zeros((b, text_len), np.int32)
  for row in range(b):
    c = int(rng.integers(0, text_len))
    text[row, :c] = rng.integers(2, SPM_VOCAB, c)
    text[row, c] = cm3.EOS_ID
  return {"tok_rgb": rng.integers(0, CODES, (b, n)).astype(np.int32), "text": text}


def _documents(batch, image_first):
  docs, lengths = cm3.build_documents(jnp.asarray(batch["tok_rgb"]), jnp.asarray(batch["text"]),
                                      jnp.asarray(image_first), VOCAB)
  return np.asarray(docs), np.asarray(lengths)


def test_documents_interleave_blocks_in_either_order():
  batch = _batch(32, 0)
  image_first = np.arange(32) % 2 == 0
  docs, lengths = _documents(batch, image_first)
  assert docs.shape == (32, N + TEXT_LEN + 4)
  for row in range(32):
    caption = batch["text"][row][:list(batch["text"][row]).index(cm3.EOS_ID)]
    img, txt = VOCAB.image_block(batch["tok_rgb"][row]), VOCAB.text_block(caption)
    want = np.concatenate([img, txt] if image_first[row] else [txt, img])
    assert lengths[row] == len(want)
    np.testing.assert_array_equal(docs[row, :len(want)], want)
    assert not docs[row, len(want):].any()


def test_causal_masking_is_exactly_invertible_with_static_shapes():
  batch = _batch(256, 1)
  docs, lengths = _documents(batch, np.arange(256) % 3 == 0)
  mask = jax.jit(lambda r, d, n: cm3.causal_mask(r, d, n, mean_spans=2.0, min_spans=0,
                                                 max_spans=SPANS,
                                                 sentinel_start=VOCAB.sentinel_start))
  seq, body_len, spans = map(np.asarray, mask(jax.random.key(0), docs, lengths))
  assert seq.shape == (256, docs.shape[1] + 2 * SPANS + 1)
  assert set(np.unique(spans)) == set(range(SPANS + 1))
  for row in range(256):
    n, k = lengths[row], spans[row]
    np.testing.assert_array_equal(cm3.uncausal(seq[row], VOCAB.sentinel_start, SPANS),
                                  docs[row, :n])
    assert seq[row, n + 2 * k] == cm3.EOS_ID and not seq[row, n + 2 * k + 1:].any()
    sentinels = [VOCAB.sentinel(i) for i in range(k)]
    body = list(seq[row, :body_len[row]])
    assert [t for t in body if t in sentinels] == sentinels  # each span once, in order
    assert seq[row, body_len[row]] == (VOCAB.sentinel(0) if k else cm3.EOS_ID)
  # Same key, same masks; another key, other masks.
  again = np.asarray(mask(jax.random.key(0), docs, lengths)[0])
  other = np.asarray(mask(jax.random.key(1), docs, lengths)[0])
  np.testing.assert_array_equal(again, seq)
  assert (other != seq).any()


def test_span_count_is_a_clamped_poisson_and_spans_cover_every_position():
  """Long documents (so the 2k <= n + 1 cap never binds): the mean span count matches
  E[clamp(Poisson(1), 1, 3)], and every position is masked sometimes."""
  rows, width, sentinels = 1500, 40, 100
  docs = jnp.tile(jnp.arange(2, 2 + width, dtype=jnp.int32), (rows, 1))
  seq, _, spans = cm3.causal_mask(jax.random.key(3), docs, jnp.full((rows,), width),
                                  mean_spans=1.0, min_spans=1, max_spans=3,
                                  sentinel_start=sentinels)
  p = [math.exp(-1) / math.factorial(i) for i in range(3)]
  expected = 1 * (p[0] + p[1]) + 2 * p[2] + 3 * (1 - sum(p))
  assert abs(float(np.mean(spans)) - expected) < 0.06  # sd of the mean ~0.018
  body = np.asarray(seq)[:, :width]
  in_body = np.zeros((rows, sentinels), bool)
  row_ids = np.repeat(np.arange(rows), width)
  is_token = body.ravel() < sentinels
  in_body[row_ids[is_token], body.ravel()[is_token]] = True
  assert not in_body[:, 2:2 + width].all(axis=0).any()  # no position is always kept


def _user(**objective):
  user = config_lib.load_file(os.path.join(ROOT, "configs", "demo_cm3.py"))
  user.batch_size, user.total_steps = 8, 3
  user.input.update(data_dir="/unused", tokenizer=TOKENIZER, text_len=TEXT_LEN)
  seq_len = N + TEXT_LEN + 4 + 2 * SPANS + 1
  user.model = dict(decoder=dict(vocab_size=VOCAB.size, max_len=seq_len, width=32, depth=1,
                                 num_heads=2, mlp_dim=64))
  user.objective = dict(name="cm3", image_tokens=N, image_vocab=CODES, max_spans=SPANS,
                        **objective)
  user.evals = {}
  user.optim.eps = 1e-6  # see conftest.tiny_config
  user.optim.schedule.warmup_steps = 1
  return user


def _config(user, mesh):
  u = user.copy_and_resolve_references()
  u.mesh = mesh
  return config_lib.load(u)


def test_trains_sharded_exactly_as_on_one_device():
  """Three steps on 8 devices (data 4 x fsdp 2) equal the same steps on one device, and the
  loss falls on a repeated batch."""
  user = _user()
  batches = [_batch(8, 7)] * 3
  _, ref, ref_params, _ = train_steps(_config(user, dict(data=1, fsdp=1, tensor=1)),
                                      jax.devices()[:1], batches)
  _, got, params, _ = train_steps(_config(user, dict(data=4, fsdp=2, tensor=1)),
                                  jax.devices(), batches)
  for r, g in zip(ref, got):
    for key in ("loss", "cm3/nll_image", "cm3/nll_text", "cm3/nll_infill", "cm3/num_spans"):
      np.testing.assert_allclose(g[key], r[key], rtol=2e-5, err_msg=key)
  assert got[-1]["loss"] < got[0]["loss"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params,
               ref_params)


def test_config_errors():
  user = _user()
  user.model.decoder.vocab_size = VOCAB.size - 1
  with pytest.raises(base.ConfigError, match=f"vocab_size={VOCAB.size}"):
    _build(user)
  user = _user()
  user.model.decoder.max_len = 10
  with pytest.raises(base.ConfigError, match="max_len=10 is shorter"):
    _build(user)
  with pytest.raises(base.ConfigError, match="min_spans"):
    config_lib.load(_user(min_spans=5))
  with pytest.raises(base.ConfigError, match="image_first_prob"):
    config_lib.load(_user(image_first_prob=1.5))


def _build(user):
  from big_mm import train
  return train.build(_config(user, dict(data=1, fsdp=1, tensor=1)), devices=jax.devices()[:1])
