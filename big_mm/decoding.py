"""Autoregressive caption decoding: greedy, beam search and sampling, jit-compiled with a KV cache.

Works with any generative objective exposing
  encode(params, images) -> enc                        # every leaf has a leading batch axis
  encode(params, images, prefix=prefix) -> enc         # only when a text prefix is passed
  init_cache(params, enc, max_len) -> cache            # every leaf has a leading batch axis
  decode_step(params, enc, cache, tokens [B], position) -> (logits [B, V], cache)
  vocab_size, max_text_len (optional: the default and the limit for max_len)
(big_mm.objectives.generative.Captioning / CoCa). `prefix` (int [B, P'], every decoder takes it;
None = no text prefix) is the text prefix of a prefix-LM captioner: it goes to encode, and the
outputs are the caption only. BOS is token 0 (the pad id), fed at position 0.

`prompt` (int [B, P], every decoder takes it; None = no prompt): per row, tokens then 0-pads; row
b's prompt is its n_b tokens before the first 0 (n_b = 0 allowed; content tokens are never 0). The
prompt is teacher-forced: the token predicted after feeding position i < n_b is prompt[b, i], fed
next (never sampled; not counted in beam scores nor in the length penalty), and generation starts
right after it. `position` is absolute: the token at output index i of row b is predicted
after feeding position n_b + i. The cache is created for P + max_len positions, so
P + max_len <= objective.max_text_len; max_len defaults to max_text_len - P. `images` may be None
when a prompt is given (a decoder-only LM conditions on the prompt alone): encode then gets the
prompt in the images' place (it only gives the batch rows). A prefix and a prompt may be combined.

Outputs are int32 [B, max_len]: the generated tokens (never the prompt), EOS kept, 0 (pad) after
it. A sequence that reaches max_len without EOS is returned as is (no EOS), exactly as greedy
truncates it. Token 0 (BOS / pad) is never generated: a 0 inside a caption would read as padding
(log_likelihood and to_text skip it). Beam scores still use the model's unmodified
log-probabilities.

Each decoder is one jitted function whose loop is a `lax.while_loop` that stops as soon as every
sequence is finished (EOS generated, or max_len tokens generated). It is compiled once per
(objective, input shapes/shardings, static options) and cached by jax.jit (the objective is a
static argument, hashed by identity); sampling's temperature / top_k / top_p and beam search's
length_penalty are traced, so changing them does not recompile. Without a prompt, the code is the
prompted one with n_b = 0 and P = 0 (output index = position).

Sharding: the images, prompt (and params) may be global jax.Arrays sharded over the batch; nothing
is replicated, the batch sharding propagates through encode/init_cache/decode_step. Per-row
positions (the prompt lengths) only enter elementwise ops: a generated token is written where a
one-hot of its row's output index is set. Beam search uses an example-major layout: enc and cache
rows are `jnp.repeat(x, beam_size, axis=0)`, so row b * beam_size + k is beam k of example b. A
contiguous batch sharding of B examples is then a contiguous sharding of the B * beam_size rows
in which each device holds whole examples' beams, and beams are reordered within an example (a
gather along the beam axis of [B, beam, ...]), so no rows cross devices, whatever beam_size is.

Beam search score: log p(y) / lp(|y|), the Google NMT / T5 length penalty
lp(n) = ((5 + n) / 6) ** length_penalty, where n counts generated tokens including EOS
(length_penalty = 0: plain log-probability). Each step ranks the beam_size * vocab extensions of
an example with a sort (not lax.top_k, which GSPMD would gather over the batch). While row b's
prompt is fed, its beams are frozen: every alive beam takes the prompt token, scores unchanged.
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

def greedy(objective, params, images, *, max_len=None, eos_id=1, prefix=None, prompt=None):
  """-> int32 [B, max_len]: the argmax token at every step, stopping at EOS."""
  images, prompt, max_len = _check_inputs(objective, images, prompt, max_len)
  return _sample_jit(_Static(objective), params, images, prefix, None, None, None, None, prompt,
                     max_len=max_len, eos_id=int(eos_id), argmax=True, use_top_k=False,
                     use_top_p=False)


def sample(objective, params, images, rng, *, max_len=None, temperature=1.0, top_k=0, top_p=1.0,
           eos_id=1, prefix=None, prompt=None):
  """-> int32 [B, max_len]: ancestral sampling; deterministic given `rng` (a jax PRNG key).

  Logits are divided by `temperature` (0 = argmax, i.e. greedy), then restricted to the `top_k`
  most likely tokens (0 = all), then to the nucleus: the smallest set of most likely tokens whose
  probability reaches `top_p` (1 = all). Tokens tied with the least likely kept one are kept too.
  The option values are traced: changing them does not recompile (switching top-k / top-p on or
  off, or temperature to/from 0, does).
  """
  images, prompt, max_len = _check_inputs(objective, images, prompt, max_len)
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
    return greedy(objective, params, images, max_len=max_len, eos_id=eos_id, prefix=prefix,
                  prompt=prompt)
  return _sample_jit(_Static(objective), params, images, prefix, rng, jnp.float32(temperature),
                     jnp.int32(top_k), jnp.float32(top_p), prompt, max_len=max_len,
                     eos_id=int(eos_id), argmax=False, use_top_k=top_k > 0, use_top_p=top_p < 1)


def beam_search(objective, params, images, *, max_len=None, beam_size=4, length_penalty=0.6,
                eos_id=1, prefix=None, prompt=None):
  """-> int32 [B, max_len]: per example, the best-scoring finished hypothesis of a beam search.

  Per example and step, the 2 * beam_size most likely extensions of the alive beams are ranked by
  log-probability; those ending in EOS (or at max_len) finish when among the top beam_size, the
  best beam_size that do not end stay alive. The beam_size best-scoring finished hypotheses are
  kept; the search stops when no alive beam can still beat the worst of them, or at max_len.
  beam_size=1 with length_penalty=0 is exactly greedy. Score: see the module docstring
  (`length_penalty` = alpha >= 0; a prompt's tokens are not scored).
  """
  images, prompt, max_len = _check_inputs(objective, images, prompt, max_len)
  beam_size, length_penalty = int(beam_size), float(length_penalty)
  if beam_size < 1:
    raise ValueError(f"beam_size must be >= 1, got {beam_size}.")
  if not length_penalty >= 0:
    raise ValueError(f"length_penalty must be >= 0 (0 = plain log-probability), got "
                     f"{length_penalty}.")
  return _beam_jit(_Static(objective), params, images, prefix, jnp.float32(length_penalty),
                   prompt, max_len=max_len, beam_size=beam_size, eos_id=int(eos_id))


def decode(objective, params, images, *, method="greedy", rng=None, prefix=None, prompt=None,
           **options):
  """Dispatches to greedy / beam_search / sample by `method` ("greedy" | "beam" | "sample");
  `prefix`: the text prefix, `prompt`: the forced start of the output (module docstring), or
  None."""
  if method not in METHODS:
    raise ValueError(f"Unknown decoding method {method!r}; valid: {', '.join(METHODS)}.")
  unknown = sorted(set(options) - set(_OPTIONS[method]))
  if unknown:
    raise ValueError(f"Unknown option(s) {unknown} for method {method!r}; valid: "
                     f"{', '.join(_OPTIONS[method])}" + (" and rng" if method == "sample" else "")
                     + ".")
  if method == "greedy":
    return greedy(objective, params, images, prefix=prefix, prompt=prompt, **options)
  if method == "beam":
    return beam_search(objective, params, images, prefix=prefix, prompt=prompt, **options)
  return sample(objective, params, images, rng, prefix=prefix, prompt=prompt, **options)


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


def _check_inputs(objective, images, prompt, max_len):
  """-> (images, prompt, max_len), checked; a prompt stands in for missing images."""
  if prompt is None:
    if images is None:
      raise ValueError("images is None: pass images, or a prompt (int [B, P]) to condition on "
                       "alone (a decoder-only LM).")
    return images, None, _check_max_len(objective, max_len)
  if not isinstance(prompt, jax.Array):
    prompt = np.asarray(prompt)
  if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"prompt must be int [B, P] (per row: tokens, then 0-pads), got "
                     f"{prompt.dtype} {tuple(prompt.shape)}.")
  if images is None:
    images = prompt
  batch = jax.tree.leaves(images)[0].shape[0]
  if prompt.shape[0] != batch:
    raise ValueError(f"prompt has {prompt.shape[0]} rows but the images {batch}: pass one prompt "
                     "row per image.")
  return images, prompt, _check_max_len(objective, max_len, prompt.shape[1])


def _check_max_len(objective, max_len, prompt_len=0):
  limit = getattr(objective, "max_text_len", None)
  if max_len is None:
    if limit is None:
      raise ValueError("Pass max_len (the objective has no max_text_len to default to).")
    if limit - prompt_len < 1:
      raise ValueError(f"A prompt of width {prompt_len} leaves no room to generate within "
                       f"objective.max_text_len={limit}: pass a narrower prompt.")
    return int(limit) - prompt_len
  max_len = int(max_len)
  if max_len < 1 or (limit is not None and prompt_len + max_len > limit):
    room = "" if not prompt_len else f" - prompt width {prompt_len}"
    raise ValueError(f"max_len must be in [1, objective.max_text_len={limit}{room}], got "
                     f"{max_len}.")
  return max_len


def _prompt_lengths(prompt, batch):
  """-> (P, n [B]): the prompt width and each row's prompt length (its tokens before a 0)."""
  if prompt is None:
    return 0, jnp.zeros((batch,), jnp.int32)
  width = prompt.shape[1]
  first_pad = jnp.where(prompt == _PAD_ID, jnp.arange(width, dtype=jnp.int32), width)
  return width, jnp.min(first_pad, axis=1, initial=width)


def _prompt_token(prompt, pos, batch):
  """-> [B]: the prompt's column pos (used where pos < that row's prompt length)."""
  if prompt is None or prompt.shape[1] == 0:
    return jnp.zeros((batch,), jnp.int32)
  pos = jnp.minimum(pos, prompt.shape[1] - 1)
  return jax.lax.dynamic_index_in_dim(prompt, pos, axis=1, keepdims=False).astype(jnp.int32)


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
def _sample_jit(objective, params, images, prefix, rng, temperature, top_k, top_p, prompt=None, *,
                max_len, eos_id, argmax, use_top_k, use_top_p):
  objective = objective.obj
  enc = _encode(objective, params, images, prefix)
  batch = jax.tree.leaves(images)[0].shape[0]  # images may be NaFlex's {"x", "mask", "shape"}
  prompt_width, prompt_len = _prompt_lengths(prompt, batch)
  cache = objective.init_cache(params, enc, prompt_width + max_len)

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
    return (pos < prompt_width + max_len) & ~jnp.all(done)

  def body(state):
    pos, last, cache, out, done = state
    logits, cache = objective.decode_step(params, enc, cache, last, pos)
    index = pos - prompt_len  # [B]: the output index predicted here (< 0: a prompt token)
    token = jnp.where(done, 0, pick(logits, pos))
    token = jnp.where(index < 0, _prompt_token(prompt, pos, batch), token)
    out = jnp.where(jnp.arange(max_len) == index[:, None], token[:, None], out)
    ends = (token == eos_id) | (index == max_len - 1)
    return pos + 1, token, cache, out, done | ((index >= 0) & ends)

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
def _beam_jit(objective, params, images, prefix, length_penalty, prompt=None, *, max_len, beam_size,
              eos_id):
  objective = objective.obj
  k = beam_size
  batch = jax.tree.leaves(images)[0].shape[0]
  prompt_width, prompt_len = _prompt_lengths(prompt, batch)
  # Example-major rows: row b * k + j is beam j of example b.
  enc = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0),
                     _encode(objective, params, images, prefix))
  cache = objective.init_cache(params, enc, prompt_width + max_len)
  best_possible_lp = _length_penalty(max_len, length_penalty)

  def reorder(cache, parents):
    def one(x):
      x = x.reshape((batch, k) + x.shape[1:])
      return _gather_beams(x, parents).reshape((batch * k,) + x.shape[2:])
    return jax.tree.map(one, cache)

  def cond(state):
    return (state["pos"] < prompt_width + max_len) & ~state["done"]

  def body(state):
    pos = state["pos"]
    logits, cache = objective.decode_step(params, enc, state["cache"],
                                          state["last"].reshape(batch * k), pos)
    # [B, 1]: the output index predicted here (< 0: a prompt token; >= max_len: past the end).
    index = (pos - prompt_len)[:, None]
    logp = _without_pad(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    vocab = logp.shape[-1]
    candidates = state["alive_logp"][:, :, None] + logp.reshape(batch, k, vocab)
    # 2k candidates: each beam has one EOS extension, so at least k of them do not end in EOS.
    cand_logp, flat_idx = _top_k(candidates.reshape(batch, k * vocab), 2 * k)
    parents, tokens = flat_idx // vocab, flat_idx % vocab
    cand_seqs = _gather_beams(state["alive_seqs"], parents)
    cand_seqs = jnp.where(jnp.arange(max_len) == index[:, :, None], tokens[:, :, None], cand_seqs)
    ends = (tokens == eos_id) | (index == max_len - 1)

    # Finished: the best k of the kept ones and the candidates that end here, if they rank among
    # this step's top k (as fairseq / Hugging Face do: beam_size=1 is then exactly greedy).
    finishing = ends & (jnp.arange(2 * k) < k)
    length = jnp.maximum(index, 0) + 1.0
    new_scores = jnp.where(finishing, cand_logp / _length_penalty(length, length_penalty), _NEG)
    fin_scores, idx = _top_k(jnp.concatenate([state["fin_scores"], new_scores], axis=1), k)
    fin_seqs = _gather_beams(jnp.concatenate([state["fin_seqs"], cand_seqs], axis=1), idx)

    # Alive: the best k candidates that do not end.
    alive_logp, idx = _top_k(jnp.where(ends, _NEG, cand_logp), k)
    alive_seqs = _gather_beams(cand_seqs, idx)
    parents = jnp.take_along_axis(parents, idx, axis=1)
    last = jnp.take_along_axis(tokens, idx, axis=1)

    # An example that is not generating (its prompt is fed, or it is past max_len) keeps its
    # beams and scores; its beams all take the prompt token.
    frozen = (index < 0) | (index >= max_len)
    new = dict(alive_seqs=alive_seqs, alive_logp=alive_logp, fin_seqs=fin_seqs,
               fin_scores=fin_scores)
    new = jax.tree.map(lambda x, old: jnp.where(frozen.reshape((batch,) + (1,) * (x.ndim - 1)),
                                                old, x), new, {n: state[n] for n in new})
    parents = jnp.where(frozen, jnp.arange(k), parents)
    last = jnp.where(frozen, _prompt_token(prompt, pos, batch)[:, None], last)
    cache = reorder(cache, parents)

    # Done when, for every example, no alive beam can beat the worst finished one (log p only
    # falls as tokens are added, and the length penalty is largest at max_len), or max_len
    # tokens were generated.
    done = jnp.all((new["fin_scores"][:, -1] >= new["alive_logp"][:, 0] / best_possible_lp)
                   | (index[:, 0] >= max_len - 1))
    return dict(pos=pos + 1, last=last, cache=cache, done=done, **new)

  first_beam_only = jnp.where(jnp.arange(k) == 0, 0.0, _NEG)  # the k beams start identical
  state = dict(
      pos=jnp.int32(0),
      last=jnp.zeros((batch, k), jnp.int32),  # the tokens fed next: BOS first
      alive_seqs=jnp.zeros((batch, k, max_len), jnp.int32),
      alive_logp=jnp.broadcast_to(first_beam_only, (batch, k)),
      cache=cache,
      fin_seqs=jnp.zeros((batch, k, max_len), jnp.int32),
      fin_scores=jnp.full((batch, k), _NEG, jnp.float32),
      done=jnp.bool_(False))
  state = jax.lax.while_loop(cond, body, state)
  return state["fin_seqs"][:, 0]  # _top_k keeps them sorted: index 0 is the best
