"""Autoregressive caption decoding: greedy, beam search and sampling, jit-compiled with a KV cache.

Works with any generative objective exposing
  encode(params, images) -> enc                        # every leaf has a leading batch axis
  encode(params, images, prefix=prefix) -> enc         # only when a text prefix is passed
  init_cache(params, enc, max_len) -> cache            # every leaf has a leading batch axis
  decode_step(params, enc, cache, tokens [B], position) -> (logits [B, V], cache)
  vocab_size, max_text_len (optional: the default and the limit for max_len)
(big_mm.objectives.generative.Captioning / CoCa). `prefix` (int [B, P], every decoder takes it;
None = no text prefix) is the text prefix of a prefix-LM captioner: it goes to encode, and the
outputs are the caption only. BOS is token 0 (the pad id), fed at position 0;
the token generated at output index i is predicted after feeding position i.

Outputs are int32 [B, max_len]: the generated tokens, EOS kept, 0 (pad) after it. A sequence that
reaches max_len without EOS is returned as is (no EOS), exactly as greedy truncates it. Token 0
(BOS / pad) is never generated: a 0 inside a caption would read as padding (log_likelihood and
to_text skip it). Beam scores still use the model's unmodified log-probabilities.

Each decoder is one jitted function whose loop is a `lax.while_loop` that stops as soon as every
sequence is finished. It is compiled once per (objective, input shapes/shardings, static options)
and cached by jax.jit (the objective is a static argument, hashed by identity); sampling's
temperature / top_k / top_p and beam search's length_penalty are traced, so changing them does
not recompile.

Sharding: the images (and params) may be global jax.Arrays sharded over the batch; nothing is
replicated, the batch sharding propagates through encode/init_cache/decode_step. Beam search uses
an example-major layout: enc and cache rows are `jnp.repeat(x, beam_size, axis=0)`, so row
b * beam_size + k is beam k of example b. A contiguous batch sharding of B examples is then a
contiguous sharding of the B * beam_size rows in which each device holds whole examples' beams,
and beams are reordered within an example (a gather along the beam axis of [B, beam, ...]), so no
rows cross devices, whatever beam_size is.

Beam search score: log p(y) / lp(|y|), the Google NMT / T5 length penalty
lp(n) = ((5 + n) / 6) ** length_penalty, where n counts generated tokens including EOS
(length_penalty = 0: plain log-probability). Each step ranks the beam_size * vocab extensions of
an example with a sort (not lax.top_k, which GSPMD would gather over the batch).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("greedy", "beam", "sample")
_OPTIONS = {
    "greedy": ("max_len", "eos_id"),
    "beam": ("max_len", "beam_size", "length_penalty", "eos_id"),
    "sample": ("max_len", "temperature", "top_k", "top_p", "eos_id"),
}
# Score of impossible hypotheses: finite, so no inf - inf or 0 * inf NaNs appear.
_NEG = -1e9
_PAD_ID = 0  # also BOS; never generated


class _Static:
  """Hashes by identity: lets any objective be a static jit argument (one compile per objective)."""
  __slots__ = ("obj",)

  def __init__(self, obj):
    self.obj = obj

  def __hash__(self):
    return id(self.obj)

  def __eq__(self, other):
    return isinstance(other, _Static) and other.obj is self.obj


# ---------------------------------------------------------------------------------------------
# Public API.

def greedy(objective, params, images, *, max_len=None, eos_id=1, prefix=None):
  """-> int32 [B, max_len]: the argmax token at every step, stopping at EOS."""
  max_len = _check_max_len(objective, max_len)
  return _sample_jit(_Static(objective), params, images, prefix, None, None, None, None,
                     max_len=max_len, eos_id=int(eos_id), argmax=True, use_top_k=False,
                     use_top_p=False)


def sample(objective, params, images, rng, *, max_len=None, temperature=1.0, top_k=0, top_p=1.0,
           eos_id=1, prefix=None):
  """-> int32 [B, max_len]: ancestral sampling; deterministic given `rng` (a jax PRNG key).

  Logits are divided by `temperature` (0 = argmax, i.e. greedy), then restricted to the `top_k`
  most likely tokens (0 = all), then to the nucleus: the smallest set of most likely tokens whose
  probability reaches `top_p` (1 = all). Tokens tied with the least likely kept one are kept too.
  The option values are traced: changing them does not recompile (switching top-k / top-p on or
  off, or temperature to/from 0, does).
  """
  max_len = _check_max_len(objective, max_len)
  temperature, top_k, top_p = float(temperature), int(top_k), float(top_p)
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
  vocab_size = getattr(objective, "vocab_size", None)
  if top_k < 0 or (vocab_size is not None and top_k > vocab_size):
    raise ValueError(f"top_k must be in [0, vocab_size={vocab_size}] (0 = no top-k), got {top_k}.")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filtering), got {top_p}.")
  if rng is None:
    raise ValueError("sample needs rng, a jax PRNG key (e.g. jax.random.key(0)).")
  if temperature == 0:
    return greedy(objective, params, images, max_len=max_len, eos_id=eos_id, prefix=prefix)
  return _sample_jit(_Static(objective), params, images, prefix, rng, jnp.float32(temperature),
                     jnp.int32(top_k), jnp.float32(top_p), max_len=max_len, eos_id=int(eos_id),
                     argmax=False, use_top_k=top_k > 0, use_top_p=top_p < 1)


def beam_search(objective, params, images, *, max_len=None, beam_size=4, length_penalty=0.6,
                eos_id=1, prefix=None):
  """-> int32 [B, max_len]: per example, the best-scoring finished hypothesis of a beam search.

  Per example and step, the 2 * beam_size most likely extensions of the alive beams are ranked by
  log-probability; those ending in EOS (or at max_len) finish when among the top beam_size, the
  best beam_size that do not end stay alive. The beam_size best-scoring finished hypotheses are
  kept; the search stops when no alive beam can still beat the worst of them, or at max_len.
  beam_size=1 with length_penalty=0 is exactly greedy. Score: see the module docstring
  (`length_penalty` = alpha >= 0).
  """
  max_len = _check_max_len(objective, max_len)
  beam_size, length_penalty = int(beam_size), float(length_penalty)
  if beam_size < 1:
    raise ValueError(f"beam_size must be >= 1, got {beam_size}.")
  if not length_penalty >= 0:
    raise ValueError(f"length_penalty must be >= 0 (0 = plain log-probability), got "
                     f"{length_penalty}.")
  return _beam_jit(_Static(objective), params, images, prefix, jnp.float32(length_penalty),
                   max_len=max_len, beam_size=beam_size, eos_id=int(eos_id))


def decode(objective, params, images, *, method="greedy", rng=None, prefix=None, **options):
  """Dispatches to greedy / beam_search / sample by `method` ("greedy" | "beam" | "sample");
  `prefix`: the text prefix (module docstring) or None."""
  if method not in METHODS:
    raise ValueError(f"Unknown decoding method {method!r}; valid: {', '.join(METHODS)}.")
  unknown = sorted(set(options) - set(_OPTIONS[method]))
  if unknown:
    raise ValueError(f"Unknown option(s) {unknown} for method {method!r}; valid: "
                     f"{', '.join(_OPTIONS[method])}" + (" and rng" if method == "sample" else "")
                     + ".")
  if method == "greedy":
    return greedy(objective, params, images, prefix=prefix, **options)
  if method == "beam":
    return beam_search(objective, params, images, prefix=prefix, **options)
  return sample(objective, params, images, rng, prefix=prefix, **options)


def to_text(tokenizer, tokens) -> list[str]:
  """int [B, L] decoder outputs -> B strings (cut at the first EOS, padding dropped)."""
  if isinstance(tokens, jax.Array) and not tokens.is_fully_addressable:
    from jax.experimental import multihost_utils  # multi-host: every process gets all rows
    tokens = multihost_utils.process_allgather(tokens, tiled=True)
  return tokenizer.decode(np.asarray(tokens))


def _encode(objective, params, images, prefix):
  if prefix is None:  # objectives without a text prefix need not take the argument
    return objective.encode(params, images)
  return objective.encode(params, images, prefix=prefix)


def _check_max_len(objective, max_len):
  limit = getattr(objective, "max_text_len", None)
  if max_len is None:
    if limit is None:
      raise ValueError("Pass max_len (the objective has no max_text_len to default to).")
    return int(limit)
  max_len = int(max_len)
  if max_len < 1 or (limit is not None and max_len > limit):
    raise ValueError(f"max_len must be in [1, objective.max_text_len={limit}], got {max_len}.")
  return max_len


# ---------------------------------------------------------------------------------------------
# Greedy and sampling: one token per sequence per step.

def _without_pad(logits):
  return jnp.where(jnp.arange(logits.shape[-1]) == _PAD_ID, _NEG, logits)


def _filter_logits(logits, top_k, top_p, use_top_k, use_top_p):
  """Logits with tokens outside the top-k and the nucleus set to _NEG."""
  sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
  if use_top_k:
    kth_largest = jax.lax.dynamic_index_in_dim(sorted_logits, top_k - 1, axis=1)
    logits = jnp.where(logits >= kth_largest, logits, _NEG)
    sorted_logits = jnp.where(jnp.arange(logits.shape[-1]) < top_k, sorted_logits, _NEG)
  if use_top_p:
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The most likely token always stays (its mass_before is 0).
    smallest_kept = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1,
                            keepdims=True)
    logits = jnp.where(logits >= smallest_kept, logits, _NEG)
  return logits


@functools.partial(jax.jit, static_argnames=("objective", "max_len", "eos_id", "argmax",
                                             "use_top_k", "use_top_p"))
def _sample_jit(objective, params, images, prefix, rng, temperature, top_k, top_p, *, max_len,
                eos_id, argmax, use_top_k, use_top_p):
  objective = objective.obj
  enc = _encode(objective, params, images, prefix)
  cache = objective.init_cache(params, enc, max_len)
  batch = jax.tree.leaves(images)[0].shape[0]  # images may be NaFlex's {"x", "mask", "shape"}

  def pick(logits, pos):
    logits = _without_pad(logits.astype(jnp.float32))
    if argmax:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if use_top_k or use_top_p:
      logits = _filter_logits(logits, top_k, top_p, use_top_k, use_top_p)
    key = jax.random.fold_in(rng, pos)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

  def cond(state):
    pos, _, _, _, done = state
    return (pos < max_len) & ~jnp.all(done)

  def body(state):
    pos, last, cache, out, done = state
    logits, cache = objective.decode_step(params, enc, cache, last, pos)
    token = jnp.where(done, 0, pick(logits, pos))
    out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], pos, axis=1)
    return pos + 1, token, cache, out, done | (token == eos_id)

  state = (jnp.int32(0), jnp.zeros((batch,), jnp.int32), cache,
           jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((batch,), bool))
  return jax.lax.while_loop(cond, body, state)[3]


# ---------------------------------------------------------------------------------------------
# Beam search.

def _length_penalty(length, alpha):
  return ((5.0 + length) / 6.0) ** alpha


def _top_k(x, k):
  """lax.top_k over the last axis as a sort: GSPMD partitions a sort along the batch, while it
  all-gathers lax.top_k's operand (on CPU; seen in the compiled HLO), here [B, beam * vocab]."""
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  neg_sorted, idx = jax.lax.sort((-x, iota), dimension=x.ndim - 1, num_keys=1)
  return -neg_sorted[..., :k], idx[..., :k]


def _gather_beams(x, beam_idx):
  """x [B, K, ...], beam_idx [B, K'] -> [B, K', ...]: per example, the chosen beams."""
  return jax.vmap(lambda rows, idx: rows[idx])(x, beam_idx)


@functools.partial(jax.jit, static_argnames=("objective", "max_len", "beam_size", "eos_id"))
def _beam_jit(objective, params, images, prefix, length_penalty, *, max_len, beam_size, eos_id):
  objective = objective.obj
  k = beam_size
  batch = jax.tree.leaves(images)[0].shape[0]
  # Example-major rows: row b * k + j is beam j of example b.
  enc = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0),
                     _encode(objective, params, images, prefix))
  cache = objective.init_cache(params, enc, max_len)
  best_possible_lp = _length_penalty(max_len, length_penalty)

  def reorder(cache, parents):
    def one(x):
      x = x.reshape((batch, k) + x.shape[1:])
      return _gather_beams(x, parents).reshape((batch * k,) + x.shape[2:])
    return jax.tree.map(one, cache)

  def cond(state):
    return (state["pos"] < max_len) & ~state["done"]

  def body(state):
    pos, alive_seqs = state["pos"], state["alive_seqs"]
    last = jnp.where(pos == 0, 0, alive_seqs[:, :, jnp.maximum(pos - 1, 0)])
    logits, cache = objective.decode_step(params, enc, state["cache"], last.reshape(batch * k), pos)
    logp = _without_pad(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    vocab = logp.shape[-1]
    candidates = state["alive_logp"][:, :, None] + logp.reshape(batch, k, vocab)
    # 2k candidates: each beam has one EOS extension, so at least k of them do not end in EOS.
    cand_logp, flat_idx = _top_k(candidates.reshape(batch, k * vocab), 2 * k)
    parents, tokens = flat_idx // vocab, flat_idx % vocab
    cand_seqs = _gather_beams(alive_seqs, parents)
    cand_seqs = jax.lax.dynamic_update_slice_in_dim(cand_seqs, tokens[:, :, None], pos, axis=2)
    ends = (tokens == eos_id) | (pos == max_len - 1)

    # Finished: the best k of the kept ones and the candidates that end here, if they rank among
    # this step's top k (as fairseq / Hugging Face do: beam_size=1 is then exactly greedy).
    finishing = ends & (jnp.arange(2 * k) < k)
    new_scores = jnp.where(finishing, cand_logp / _length_penalty(pos + 1.0, length_penalty),
                           _NEG)
    fin_scores, idx = _top_k(jnp.concatenate([state["fin_scores"], new_scores], axis=1), k)
    fin_seqs = _gather_beams(jnp.concatenate([state["fin_seqs"], cand_seqs], axis=1), idx)

    # Alive: the best k candidates that do not end.
    alive_logp, idx = _top_k(jnp.where(ends, _NEG, cand_logp), k)
    alive_seqs = _gather_beams(cand_seqs, idx)
    cache = reorder(cache, jnp.take_along_axis(parents, idx, axis=1))

    # Done when, for every example, no alive beam can beat the worst finished one: log p only
    # falls as tokens are added, and the length penalty is largest at max_len.
    done = jnp.all(fin_scores[:, -1] >= alive_logp[:, 0] / best_possible_lp)
    return dict(pos=pos + 1, alive_seqs=alive_seqs, alive_logp=alive_logp, cache=cache,
                fin_seqs=fin_seqs, fin_scores=fin_scores, done=done)

  first_beam_only = jnp.where(jnp.arange(k) == 0, 0.0, _NEG)  # the k beams start identical
  state = dict(
      pos=jnp.int32(0),
      alive_seqs=jnp.zeros((batch, k, max_len), jnp.int32),
      alive_logp=jnp.broadcast_to(first_beam_only, (batch, k)),
      cache=cache,
      fin_seqs=jnp.zeros((batch, k, max_len), jnp.int32),
      fin_scores=jnp.full((batch, k), _NEG, jnp.float32),
      done=jnp.bool_(False))
  state = jax.lax.while_loop(cond, body, state)
  return state["fin_seqs"][:, 0]  # _top_k keeps them sorted: index 0 is the best
