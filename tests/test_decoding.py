"""big_mm.decoding on toy objectives whose probabilities can be recomputed independently."""
import itertools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from big_mm import decoding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = 1


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


class MarkovObjective:
  """Second-order Markov chain: logits = first[token] + second[cache.prev] + image bias.

  The cache holds the previous token, so beam search must reorder it correctly."""

  def __init__(self, vocab_size=6, max_text_len=6):
    self.vocab_size = vocab_size
    self.max_text_len = max_text_len
    self.encode_traces = 0

  def init_params(self, seed=0, image_dim=12):
    r = np.random.RandomState(seed)
    v = self.vocab_size
    return {"first": jnp.asarray(2 * r.randn(v, v), jnp.float32),
            "second": jnp.asarray(r.randn(v, v), jnp.float32),
            "proj": jnp.asarray(r.randn(image_dim, v), jnp.float32)}

  def encode(self, params, images):
    self.encode_traces += 1  # runs once per trace: counts compilations
    return {"bias": images.reshape(images.shape[0], -1) @ params["proj"]}

  def init_cache(self, params, enc, max_len):
    return {"prev": jnp.zeros(enc["bias"].shape[:1], jnp.int32)}

  def decode_step(self, params, enc, cache, tokens, position):
    logits = params["first"][tokens] + params["second"][cache["prev"]] + enc["bias"]
    return logits, {"prev": tokens}

  def numpy_logp(self, params, image, seq):
    """Independent teacher-forced log p(seq | image) (seq without padding)."""
    p = jax.tree.map(np.asarray, params)
    bias = np.asarray(image).reshape(-1) @ p["proj"]
    inputs = [0] + list(seq[:-1])
    prevs = [0] + inputs[:-1]
    total = 0.0
    for tok, prev, target in zip(inputs, prevs, seq):
      total += _log_softmax(p["first"][tok] + p["second"][prev] + bias)[target]
    return total


class BufferObjective:
  """The cache is the whole token buffer; every step rescores it from scratch:
  logits(position) = bias + sum_{i <= position} weight[i, input_i]."""

  def __init__(self, vocab_size=4, max_text_len=4):
    self.vocab_size = vocab_size
    self.max_text_len = max_text_len

  def init_params(self, seed=1, image_dim=12):
    r = np.random.RandomState(seed)
    v, n = self.vocab_size, self.max_text_len
    return {"weight": jnp.asarray(r.randn(n, v, v), jnp.float32),
            "proj": jnp.asarray(r.randn(image_dim, v), jnp.float32)}

  def encode(self, params, images):
    return {"bias": images.reshape(images.shape[0], -1) @ params["proj"]}

  def init_cache(self, params, enc, max_len):
    return {"buf": jnp.zeros((enc["bias"].shape[0], max_len), jnp.int32)}

  def decode_step(self, params, enc, cache, tokens, position):
    buf = jax.lax.dynamic_update_slice_in_dim(cache["buf"], tokens[:, None], position, axis=1)
    seen = jnp.arange(buf.shape[1]) <= position
    contrib = params["weight"][jnp.arange(buf.shape[1])[None, :], buf]  # [B, L, V]
    logits = enc["bias"] + jnp.sum(jnp.where(seen[None, :, None], contrib, 0.0), axis=1)
    return logits, {"buf": buf}

  def numpy_logp(self, params, image, seq):
    p = jax.tree.map(np.asarray, params)
    bias = np.asarray(image).reshape(-1) @ p["proj"]
    inputs = [0] + list(seq[:-1])
    total = 0.0
    for pos, target in enumerate(seq):
      logits = bias + sum(p["weight"][i, inputs[i]] for i in range(pos + 1))
      total += _log_softmax(logits)[target]
    return total


class FixedObjective:
  """The same next-token distribution at every step, whatever the input."""

  def __init__(self, probs):
    self.logits = np.log(np.asarray(probs, np.float32))
    self.vocab_size = len(probs)
    self.max_text_len = 8

  def encode(self, params, images):
    return {"x": images}

  def init_cache(self, params, enc, max_len):
    return {"x": jnp.zeros(enc["x"].shape[:1])}

  def decode_step(self, params, enc, cache, tokens, position):
    return jnp.broadcast_to(jnp.asarray(self.logits), (tokens.shape[0], self.vocab_size)), cache


class PrefixMarkovObjective(MarkovObjective):
  """MarkovObjective whose encode also takes a text prefix: its first token's logit is raised."""

  def encode(self, params, images, prefix=None):
    enc = super().encode(params, images)
    if prefix is not None:
      enc["bias"] = enc["bias"] + 4.0 * jax.nn.one_hot(prefix[:, 0], self.vocab_size)
    return enc


@pytest.fixture(scope="module")
def markov():
  """One objective shared by the tests, so they share its compiled decoders."""
  obj = MarkovObjective()
  return obj, obj.init_params()


def _images(n, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(n, 2, 2, 3), jnp.float32)


def _strip(row):
  """Generated tokens up to and including EOS (or all of them when there is no EOS)."""
  row = list(np.asarray(row))
  return row[:row.index(EOS) + 1] if EOS in row else row


def _check_padding(tokens):
  for row in np.asarray(tokens):
    seq = _strip(row)
    assert not np.any(row[len(seq):]), f"not 0-padded after EOS: {row}"


def _all_hypotheses(vocab_size, max_len):
  """Every complete output: word tokens then EOS, or max_len word tokens (truncated).
  Word tokens: neither EOS nor 0 (pad / BOS, which decoders never generate)."""
  others = [t for t in range(vocab_size) if t not in (0, EOS)]
  for n in range(max_len):
    for prefix in itertools.product(others, repeat=n):
      yield list(prefix) + [EOS]
  yield from (list(p) for p in itertools.product(others, repeat=max_len))


def _score(logp, length, alpha):
  return logp / ((5.0 + length) / 6.0) ** alpha


def test_greedy_is_stepwise_argmax_with_eos_and_padding(markov):
  obj, params = markov
  images = _images(16)
  tokens = decoding.greedy(obj, params, images, max_len=6)
  assert tokens.shape == (16, 6) and tokens.dtype == jnp.int32
  _check_padding(tokens)
  p = jax.tree.map(np.asarray, params)
  stopped = 0
  for image, row in zip(np.asarray(images), np.asarray(tokens)):
    bias = image.reshape(-1) @ p["proj"]
    tok = prev = 0
    expected = []
    for _ in range(6):
      nxt = 1 + int(np.argmax((p["first"][tok] + p["second"][prev] + bias)[1:]))  # never pad
      expected.append(nxt)
      prev, tok = tok, nxt
      if nxt == EOS:
        break
    np.testing.assert_array_equal(_strip(row), expected)
    stopped += expected[-1] == EOS and len(expected) < 6
  assert stopped > 0, "the test should include sequences that stop at EOS before max_len"


def test_compiles_once_per_options():
  obj = MarkovObjective()
  params = obj.init_params()
  decoding.greedy(obj, params, _images(4), max_len=5)
  decoding.greedy(obj, params, _images(4, seed=3), max_len=5)
  assert obj.encode_traces == 1
  # Option values are traced: a new temperature / top_k / length penalty reuses the compile.
  for temperature, top_k in [(1.0, 2), (0.5, 3)]:
    decoding.sample(obj, params, _images(4), jax.random.key(0, impl="rbg"), max_len=5,
                    temperature=temperature, top_k=top_k)
  assert obj.encode_traces == 2
  for alpha in [0.0, 0.6]:
    decoding.beam_search(obj, params, _images(4), max_len=5, beam_size=2, length_penalty=alpha)
  assert obj.encode_traces == 3


def test_beam_one_equals_greedy(markov):
  obj, params = markov
  images = _images(16)
  greedy = decoding.greedy(obj, params, images, max_len=6)
  beam = decoding.beam_search(obj, params, images, max_len=6, beam_size=1, length_penalty=0.0)
  np.testing.assert_array_equal(beam, greedy)


@pytest.mark.parametrize("objective_cls", [MarkovObjective, BufferObjective])
def test_exhaustive_beam_finds_the_best_sequence(objective_cls):
  vocab, max_len = 4, 4
  obj = objective_cls(vocab_size=vocab, max_text_len=max_len)
  params = obj.init_params()
  images = _images(3, seed=5)
  hypotheses = list(_all_hypotheses(vocab, max_len))
  logps = [{tuple(h): obj.numpy_logp(params, image, h) for h in hypotheses} for image in images]
  for alpha in [0.0, 0.6]:
    # (vocab - 2) ** (max_len - 1) * (vocab - 1) beams hold every candidate of every step (pad
    # excluded): the search is exact.
    beam = decoding.beam_search(obj, params, images, max_len=max_len, beam_size=24,
                                length_penalty=alpha)
    _check_padding(beam)
    for logp, row in zip(logps, np.asarray(beam)):
      best = max(_score(lp, len(h), alpha) for h, lp in logp.items())
      got = tuple(_strip(row))
      assert _score(logp[got], len(got), alpha) >= best - 1e-4, (alpha, got)


def test_batched_equals_per_example(markov):
  obj, params = markov
  images = _images(16, seed=2)
  beam = np.asarray(decoding.beam_search(obj, params, images, max_len=6, beam_size=3,
                                         length_penalty=0.0))
  greedy = np.asarray(decoding.greedy(obj, params, images, max_len=6))
  _check_padding(beam)
  assert np.any(beam != greedy), "the test should include examples where beam search differs"
  for i in range(0, 16, 5):
    one = images[i:i + 1]
    np.testing.assert_array_equal(decoding.beam_search(obj, params, one, max_len=6, beam_size=3,
                                                       length_penalty=0.0)[0], beam[i])
    np.testing.assert_array_equal(decoding.greedy(obj, params, one, max_len=6)[0], greedy[i])


def test_sampling_limits_and_determinism(markov):
  obj, params = markov
  images = _images(16)
  greedy = decoding.greedy(obj, params, images, max_len=6)
  rng = jax.random.key(7, impl="rbg")  # compiles faster than the default threefry
  np.testing.assert_array_equal(decoding.sample(obj, params, images, rng, max_len=6, top_k=1),
                                greedy)
  np.testing.assert_array_equal(
      decoding.sample(obj, params, images, rng, max_len=6, temperature=1e-4), greedy)
  np.testing.assert_array_equal(
      decoding.sample(obj, params, images, rng, max_len=6, temperature=0.0), greedy)
  a = decoding.sample(obj, params, images, rng, max_len=6, temperature=2.0)
  _check_padding(a)
  np.testing.assert_array_equal(a, decoding.sample(obj, params, images, rng, max_len=6,
                                                   temperature=2.0))
  assert np.any(np.asarray(a) != np.asarray(greedy)), "sampling at T=2 should leave greedy"
  b = decoding.sample(obj, params, images, jax.random.key(8, impl="rbg"), max_len=6,
                      temperature=2.0)
  assert np.any(np.asarray(a) != np.asarray(b)), "another rng should give other samples"


def test_top_k_and_top_p_stay_in_the_allowed_set():
  # Sorted: 2 (.5), 3 (.3), 4 (.15), 5 (.03), EOS (.01), 0 (.01, pad: never generated).
  obj = FixedObjective([0.01, 0.01, 0.5, 0.3, 0.15, 0.03])
  images = _images(256)
  rng = jax.random.key(0, impl="rbg")
  nucleus = np.asarray(decoding.sample(obj, None, images, rng, max_len=8, top_p=0.9))
  assert set(np.unique(nucleus)) == {2, 3, 4}
  top2 = np.asarray(decoding.sample(obj, None, images, rng, max_len=8, top_k=2))
  assert set(np.unique(top2)) == {2, 3}
  free = np.asarray(decoding.sample(obj, None, images, rng, max_len=8))
  assert {1, 5} <= set(np.unique(free)), "without filtering, rare tokens do appear"
  _check_padding(free)
  assert all(0 not in _strip(row) for row in free), "pad (0) is never generated"


def test_sharded_equals_unsharded(markov):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  obj, params = markov
  images = _images(16, seed=4)
  sharded = jax.device_put(images, NamedSharding(mesh, P("data")))
  rng = jax.random.key(3)
  runs = {
      "greedy": lambda x: decoding.decode(obj, params, x, method="greedy", max_len=6),
      "beam": lambda x: decoding.decode(obj, params, x, method="beam", max_len=6, beam_size=3),
      "sample": lambda x: decoding.decode(obj, params, x, method="sample", rng=rng, max_len=6,
                                          top_p=0.9),
  }
  for name, run in runs.items():
    out = run(sharded)
    assert not out.sharding.is_fully_replicated, name
    np.testing.assert_array_equal(out, run(images), err_msg=name)
  # Beams stay on their example's device: per step, the only collective is the scalar
  # all-reduce of the "all finished?" flag.
  hlo = decoding._beam_jit.lower(decoding._Static(obj), params, sharded, None, jnp.float32(0.6),
                                 max_len=6, beam_size=3, eos_id=1).compile().as_text()
  collectives = [line for line in hlo.splitlines()
                 if re.search(r"(all-gather|all-reduce|all-to-all|collective-permute)\(", line)]
  assert len(collectives) == 1 and "pred[] all-reduce(" in collectives[0], collectives


def test_bad_options_raise(markov):
  obj, params = markov
  images = _images(2)
  with pytest.raises(ValueError, match="greedy, beam, sample"):
    decoding.decode(obj, params, images, method="nucleus")
  with pytest.raises(ValueError, match="beam_size"):
    decoding.decode(obj, params, images, method="greedy", beam_size=2)
  with pytest.raises(ValueError, match="rng"):
    decoding.decode(obj, params, images, method="sample")
  with pytest.raises(ValueError, match="top_p"):
    decoding.sample(obj, params, images, jax.random.key(0), top_p=0.0)
  with pytest.raises(ValueError, match="top_k"):
    decoding.sample(obj, params, images, jax.random.key(0), top_k=obj.vocab_size + 1)
  with pytest.raises(ValueError, match="max_len"):
    decoding.greedy(obj, params, images, max_len=obj.max_text_len + 1)
  with pytest.raises(ValueError, match="beam_size"):
    decoding.beam_search(obj, params, images, beam_size=0)


def test_to_text_round_trip():
  from big_mm.input.tokenizer import Tokenizer
  tok = Tokenizer(os.path.join(ROOT, "data", "digits_spm.model"))
  texts = ["handwritten 7", "a photo of the digit 3", "0"]
  tokens = jnp.asarray(tok.encode(texts, 16))
  assert decoding.to_text(tok, tokens) == texts
  # Anything after EOS is ignored, as in decoder outputs.
  noisy = np.asarray(tokens).copy()
  noisy[:, -1] = 5
  assert decoding.to_text(tok, noisy) == texts


def test_prefix_reaches_encode():
  """`prefix` goes to objective.encode (per example, beams included) in every method."""
  obj = PrefixMarkovObjective()
  params = obj.init_params()
  images = _images(8, seed=6)
  prefix = jnp.asarray(np.random.RandomState(0).randint(2, obj.vocab_size, (8, 2)), jnp.int32)
  rng = jax.random.key(1, impl="rbg")
  for method, options in [("greedy", {}), ("beam", dict(beam_size=2)), ("sample", {})]:
    if method == "sample":
      options = dict(rng=rng)
    out = np.asarray(decoding.decode(obj, params, images, method=method, prefix=prefix,
                                     max_len=6, **options))
    _check_padding(out)
    plain = np.asarray(decoding.decode(obj, params, images, method=method, max_len=6, **options))
    assert np.any(out != plain), method
    if method != "sample":  # sampling draws per batch, so one row alone differs
      for i in (0, 5):
        np.testing.assert_array_equal(
            decoding.decode(obj, params, images[i:i + 1], method=method, prefix=prefix[i:i + 1],
                            max_len=6, **options)[0], out[i], err_msg=method)


# ---------------------------------------------------------------------------------------------
# Prompts: teacher-forced per-row starts of the output.

def _bias(params, images):
  return np.asarray(images).reshape(len(images), -1) @ np.asarray(params["proj"])


def _next_logits(obj, params, bias, inputs):
  """Independent numpy logits after feeding `inputs` (BOS first) to a Markov / Buffer objective."""
  p = jax.tree.map(np.asarray, params)
  if isinstance(obj, BufferObjective):
    return bias + sum(p["weight"][i, tok] for i, tok in enumerate(inputs))
  prev = inputs[-2] if len(inputs) > 1 else 0
  return bias + p["first"][inputs[-1]] + p["second"][prev]


def _prompt_tokens(row):
  row = list(np.asarray(row))
  return row[:row.index(0)] if 0 in row else row


def _numpy_greedy(obj, params, bias, prompt_row, max_len):
  inputs, out = [0] + _prompt_tokens(prompt_row), []
  while len(out) < max_len and EOS not in out:
    out.append(1 + int(np.argmax(_next_logits(obj, params, bias, inputs)[1:])))  # never pad
    inputs.append(out[-1])
  return out


def _numpy_logp(obj, params, bias, prompt_row, seq):
  """log p(seq | prompt): the generated tokens only."""
  inputs, total = [0] + _prompt_tokens(prompt_row), 0.0
  for tok in seq:
    total += _log_softmax(_next_logits(obj, params, bias, inputs))[tok]
    inputs.append(tok)
  return total


def _prompts(n, width, vocab_size, seed=0):
  """Rows of every length 0..width (tokens in [1, vocab): EOS may be forced, pad never)."""
  r = np.random.RandomState(seed)
  tokens = r.randint(1, vocab_size, (n, width))
  lengths = np.arange(n) % (width + 1)
  return np.where(np.arange(width) < lengths[:, None], tokens, 0).astype(np.int32)


def test_greedy_with_prompt_is_teacher_forced_argmax(markov):
  buffer_obj = BufferObjective(vocab_size=5, max_text_len=7)
  for obj, params in [markov, (buffer_obj, buffer_obj.init_params())]:
    images, prompt = _images(16, seed=7), _prompts(16, 2, obj.vocab_size, seed=1)
    out = decoding.greedy(obj, params, images, prompt=prompt)  # max_len: max_text_len - 2
    assert out.shape == (16, obj.max_text_len - 2) and out.dtype == jnp.int32
    _check_padding(out)
    for bias, p, row in zip(_bias(params, images), prompt, np.asarray(out)):
      np.testing.assert_array_equal(_strip(row), _numpy_greedy(obj, params, bias, p, out.shape[1]))


def test_prompted_rows_equal_rows_alone(markov):
  """Rows of other prompt lengths in the batch change nothing (each row alone: its own width)."""
  obj, params = markov
  images, prompt = _images(16, seed=8), _prompts(16, 2, obj.vocab_size, seed=2)
  for method, options in [("greedy", {}), ("beam", dict(beam_size=3, length_penalty=0.0))]:
    out = np.asarray(decoding.decode(obj, params, images, method=method, prompt=prompt,
                                     max_len=4, **options))
    for i in ((0, 4, 8) if method == "greedy" else (0, 8)):  # prompt lengths 0, 1, 2
      alone = prompt[i:i + 1, :len(_prompt_tokens(prompt[i]))]
      np.testing.assert_array_equal(
          decoding.decode(obj, params, images[i:i + 1], method=method, prompt=alone, max_len=4,
                          **options)[0], out[i], err_msg=method)


def test_empty_prompt_equals_no_prompt(markov):
  obj, params = markov
  images, rng = _images(16, seed=9), jax.random.key(2, impl="rbg")
  runs = [("greedy", {}), ("beam", dict(beam_size=3)), ("sample", dict(rng=rng))]
  for method, options in runs:
    plain = decoding.decode(obj, params, images, method=method, max_len=4, **options)
    # Width 0 (beam's: test_prompted_rows_equal_rows_alone) and rows of 0-pads only.
    for width in (0, 2) if method == "greedy" else (2,):
      empty = np.zeros((16, width), np.int32)
      np.testing.assert_array_equal(
          decoding.decode(obj, params, images, method=method, prompt=empty, max_len=4, **options),
          plain, err_msg=f"{method}, width {width}")


def test_beam_with_prompt(markov):
  obj, params = markov
  images, prompt = _images(16, seed=8), _prompts(16, 2, obj.vocab_size, seed=2)
  np.testing.assert_array_equal(
      decoding.beam_search(obj, params, images, prompt=prompt, max_len=4, beam_size=1,
                           length_penalty=0.0),
      decoding.greedy(obj, params, images, prompt=prompt, max_len=4))
  # Exhaustive: the prompt's tokens are neither scored nor counted in the length penalty.
  vocab, max_len = 4, 3
  obj = BufferObjective(vocab_size=vocab, max_text_len=2 + max_len)  # positions matter
  params = obj.init_params()
  images, prompt = _images(16, seed=0), _prompts(16, 2, vocab, seed=0)
  hypotheses = [tuple(h) for h in _all_hypotheses(vocab, max_len)]
  logps = [{h: _numpy_logp(obj, params, bias, p, h) for h in hypotheses}
           for bias, p in zip(_bias(params, images), prompt)]
  prompt_logps = [_numpy_logp(obj, params, bias, [], _prompt_tokens(p))
                  for bias, p in zip(_bias(params, images), prompt)]
  differs = 0
  for alpha in [0.0, 2.0]:  # a strong length penalty: it tells the two scorings apart
    beam = decoding.beam_search(obj, params, images, prompt=prompt, max_len=max_len,
                                beam_size=12, length_penalty=alpha)  # exact (see above)
    _check_padding(beam)
    for logp, p, lp_prompt, row in zip(logps, prompt, prompt_logps, np.asarray(beam)):
      got = tuple(_strip(row))
      best = max(_score(lp, len(h), alpha) for h, lp in logp.items())
      assert _score(logp[got], len(got), alpha) >= best - 1e-4, (alpha, got)
      n = len(_prompt_tokens(p))
      whole = max(logp, key=lambda h: _score(lp_prompt + logp[h], n + len(h), alpha))
      differs += whole != got
  assert differs, "the test should include rows where scoring the prompt too would differ"
  # Nor in the length: with these probabilities, lp counting 4 prompt tokens would pick [EOS].
  obj = FixedObjective([0.01, 0.3, 0.5, 0.19])
  prompt = np.array([[3, 3, 3, 3], [2, 3, 0, 0], [0, 0, 0, 0]], np.int32)
  np.testing.assert_array_equal(decoding.beam_search(obj, None, _images(3), prompt=prompt,
                                                     max_len=2, length_penalty=1.0), [[2, 2]] * 3)


def test_sample_with_prompt(markov):
  obj, params = markov
  images, prompt = _images(16, seed=10), _prompts(16, 2, obj.vocab_size, seed=4)
  given = prompt.copy()
  rng = jax.random.key(5, impl="rbg")
  a = np.asarray(decoding.sample(obj, params, images, rng, prompt=prompt, max_len=4, top_k=2))
  np.testing.assert_array_equal(prompt, given)
  _check_padding(a)
  np.testing.assert_array_equal(
      a, decoding.sample(obj, params, images, rng, prompt=prompt, max_len=4, top_k=2))
  b = decoding.sample(obj, params, images, jax.random.key(6, impl="rbg"), prompt=prompt,
                      max_len=4, top_k=2)
  assert np.any(a != np.asarray(b)), "another rng should give other samples"
  # Every token is among the 2 most likely (pad excluded) after the fed prompt and samples.
  for bias, p, row in zip(_bias(params, images), prompt, a):
    inputs = [0] + _prompt_tokens(p)
    for tok in _strip(row):
      logits = _next_logits(obj, params, bias, inputs)[1:]
      assert tok in 1 + np.argsort(-logits)[:2], (inputs, tok)
      inputs.append(tok)


def test_prompt_alone_and_with_prefix():
  """images=None: encode gets the prompt (a decoder-only LM); a text prefix combines with it."""
  class PromptOnly(PrefixMarkovObjective):
    def encode(self, params, tokens, prefix=None):
      return super().encode(params, jnp.zeros((tokens.shape[0], 12)), prefix=prefix)

  obj = PromptOnly()
  params = obj.init_params()
  prompt = _prompts(8, 2, obj.vocab_size, seed=5)
  prefix = np.random.RandomState(0).randint(2, obj.vocab_size, (8, 1)).astype(np.int32)
  for pre in (None, prefix):
    out = decoding.greedy(obj, params, None, prompt=prompt, prefix=pre)
    bias = np.zeros((8, obj.vocab_size)) if pre is None else 4.0 * np.eye(obj.vocab_size)[pre[:, 0]]
    for b, p, row in zip(bias, prompt, np.asarray(out)):
      np.testing.assert_array_equal(_strip(row), _numpy_greedy(obj, params, b, p, 4))


def test_prompt_errors(markov):
  obj, params = markov
  images, prompt = _images(2), np.full((2, 2), 3, np.int32)
  with pytest.raises(ValueError, match=r"max_len must be in \[1, objective.max_text_len=6 - "):
    decoding.greedy(obj, params, images, prompt=prompt, max_len=5)
  with pytest.raises(ValueError, match="no room to generate"):
    decoding.beam_search(obj, params, images, prompt=np.full((2, 6), 3))
  with pytest.raises(ValueError, match=r"prompt must be int \[B, P\]"):
    decoding.greedy(obj, params, images, prompt=prompt[0])
  with pytest.raises(ValueError, match="one prompt row per image"):
    decoding.greedy(obj, params, images, prompt=prompt[:1])
  with pytest.raises(ValueError, match="or a prompt"):
    decoding.greedy(obj, params, None)


def test_prompted_sharded_equals_unsharded(markov):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  obj, params = markov
  images, prompt = _images(16, seed=8), _prompts(16, 2, obj.vocab_size, seed=2)
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))  # noqa: E731
  rng = jax.random.key(5, impl="rbg")
  runs = {
      "greedy": dict(method="greedy"),
      "beam": dict(method="beam", beam_size=3, length_penalty=0.0),
      "sample": dict(method="sample", rng=rng, top_k=2),
  }
  for name, options in runs.items():
    out = decoding.decode(obj, params, shard(images), prompt=shard(prompt), max_len=4, **options)
    assert not out.sharding.is_fully_replicated, name
    np.testing.assert_array_equal(
        out, decoding.decode(obj, params, images, prompt=prompt, max_len=4, **options),
        err_msg=name)
  # As without a prompt: per step, the only collective is the "all finished?" flag's all-reduce.
  hlo = decoding._beam_jit.lower(decoding._Static(obj), params, shard(images), None,
                                 jnp.float32(0.0), shard(prompt), max_len=4, beam_size=3,
                                 eos_id=1).compile().as_text()
  collectives = [line for line in hlo.splitlines()
                 if re.search(r"(all-gather|all-reduce|all-to-all|collective-permute)\(", line)]
  assert len(collectives) == 1 and "pred[] all-reduce(" in collectives[0], collectives
