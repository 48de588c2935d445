"""Text denoising transforms (T5 span corruption, UL2's sequential split), jittable with static
output shapes and per-row randomness, plus their numpy inverses (tests, evaluators).

Rows: int tokens [B, L], each row its content (nonzero) then 0-pads. A trailing EOS (1) is the
end marker, never corrupted: it is taken off before corrupting and appended to both outputs. An
all-pad row gives all-pad outputs (no targets, so no loss).

span_corrupt (T5's `random_spans_noise_mask` + `noise_span_to_unique_sentinel`, Raffel et al.
2020; google-research/text-to-text-transfer-transformer t5/data/preprocessors.py): for content
length n >= 2, num_noise = round(n * rate) clipped to [1, n - 1] and num_spans =
max(1, round(num_noise / mean_span)), also at most num_noise and n - num_noise (rounding half to
even, in float64, as Python's round). The noise and non-noise tokens are each split into
num_spans non-empty runs uniformly at random (a uniform random composition), interleaved
non-noise first, so the content always ends with a noise span. n < 2: nothing is corrupted (T5
treats a 1-token sequence likewise). inputs = the non-noise tokens, noise span k replaced by
sentinel `sentinel_start + k`, then EOS; targets = for each span k: its sentinel then its
tokens; then EOS.

prefix_split (UL2's S-denoiser): inputs = the first n - t content tokens, targets = the last t
tokens then EOS (inputs get no EOS: they are a prefix to be continued). t is uniform on
{1, ..., hi}, hi = round(2 * rate * n) clipped to [1, n - 1] (n >= 2), so E[t] ~ rate * n and at
least one token is on each side; rate 0.5 gives T5's `random_prefix_noise_mask` (the input
length uniform on [1, n - 1]). n = 1: the token is the target (empty inputs).

Output widths come from the static (L, mean_span, rate) alone: `output_lengths` /
`prefix_lengths`, the largest over every content length n <= L.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

EOS = 1


# ---- static tables --------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def span_counts(length: int, mean_span: float, rate: float) -> tuple[np.ndarray, np.ndarray]:
  """(num_noise [L + 1], num_spans [L + 1]) for every content length n = 0..L."""
  noise = np.zeros(length + 1, np.int32)
  spans = np.zeros(length + 1, np.int32)
  for n in range(2, length + 1):
    noise[n] = min(max(round(n * rate), 1), n - 1)
    spans[n] = min(max(1, round(noise[n] / mean_span)), noise[n], n - noise[n])
  return noise, spans


def output_lengths(length: int, mean_span: float, rate: float) -> tuple[int, int]:
  """(inputs width, targets width) of span_corrupt on rows of width `length`."""
  noise, spans = span_counts(length, float(mean_span), float(rate))
  n = np.arange(length + 1)
  return int(np.max(n - noise + spans)) + 1, int(np.max(noise + spans)) + 1


def max_spans(length: int, mean_span: float, rate: float) -> int:
  """The most noise spans (so sentinels) span_corrupt makes in a row of width `length`."""
  return int(np.max(span_counts(length, float(mean_span), float(rate))[1]))


@functools.lru_cache(maxsize=None)
def _prefix_target_max(length: int, rate: float) -> np.ndarray:
  """hi [L + 1]: the most target tokens of prefix_split for each content length n."""
  hi = np.zeros(length + 1, np.int32)
  for n in range(1, length + 1):
    hi[n] = 1 if n == 1 else min(max(round(2 * rate * n), 1), n - 1)
  return hi


def prefix_lengths(length: int, rate: float) -> tuple[int, int]:
  """(inputs width, targets width) of prefix_split on rows of width `length`."""
  hi = _prefix_target_max(length, float(rate))
  return max(length - 1, 1), int(np.max(hi)) + 1


# ---- jittable transforms --------------------------------------------------------------------

def _content(tokens):
  """-> (n [B]: content length without the trailing EOS, nonempty [B] bool)."""
  count = jnp.sum(tokens != 0, axis=1)
  last = jnp.take_along_axis(tokens, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
  has_eos = (count > 0) & (last == EOS)
  return count - has_eos.astype(count.dtype), count > 0


def _scatter(width, idx, values):
  """Rows of `width` with values[b, i] at idx[b, i]; idx == width (or more) is dropped."""
  b = idx.shape[0]
  out = jnp.zeros((b, width + 1), jnp.int32)
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], idx.shape)
  out = out.at[rows, jnp.minimum(idx, width)].set(values.astype(jnp.int32))
  return out[:, :width]


def _with_eos(out, pos, nonempty):
  """Writes EOS at column pos[b] of the nonempty rows."""
  cols = jnp.arange(out.shape[1])[None, :]
  return jnp.where((cols == pos[:, None]) & nonempty[:, None], EOS, out)


def _random_composition(key, total, parts, max_parts: int, width: int):
  """Splits `total` [B] items into `parts` [B] non-empty runs, uniformly over the ways to
  (choose parts - 1 distinct cut points of the total - 1 gaps) -> lengths [B, max_parts], 0
  after the first `parts` (parts == 0: one run of everything)."""
  b = total.shape[0]
  gaps = jnp.arange(1, max(width, 1), dtype=jnp.int32)[None, :]  # cut before item g
  scores = jnp.where(gaps < total[:, None],
                     jax.random.uniform(key, (b, gaps.shape[1])), 2.0)
  rank = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
  chosen = rank < (parts[:, None] - 1)
  cuts = jnp.sort(jnp.where(chosen, gaps, width + 1), axis=1)
  need = max_parts - 1
  cuts = jnp.pad(cuts, ((0, 0), (0, max(0, need - cuts.shape[1]))),
                 constant_values=width + 1)[:, :need]
  cuts = jnp.where(jnp.arange(need)[None, :] < (parts[:, None] - 1), cuts, total[:, None])
  bounds = jnp.concatenate([jnp.zeros((b, 1), cuts.dtype), cuts, total[:, None]], axis=1)
  return jnp.diff(bounds, axis=1)


def span_corrupt(rng, tokens, *, mean_span: float, rate: float, sentinel_start: int,
                 num_sentinels: int):
  """T5 span corruption of each row (module docstring) -> (inputs [B, Li], targets [B, Lt]),
  widths from output_lengths(L, mean_span, rate)."""
  tokens = jnp.asarray(tokens, jnp.int32)
  b, width = tokens.shape
  if not 0.0 < rate < 1.0 or not mean_span > 0:
    raise ValueError(f"span_corrupt needs 0 < rate < 1 and mean_span > 0; got rate={rate}, "
                     f"mean_span={mean_span}.")
  noise_table, spans_table = span_counts(width, float(mean_span), float(rate))
  most = max(int(np.max(spans_table)), 1)
  if int(np.max(spans_table)) > num_sentinels:
    raise ValueError(f"Rows of {width} tokens get up to {int(np.max(spans_table))} noise spans "
                     f"(mean_span={mean_span}, rate={rate}) but there are {num_sentinels} "
                     "sentinels; give more sentinels.")
  len_in, len_tgt = output_lengths(width, mean_span, rate)
  n, nonempty = _content(tokens)
  num_noise = jnp.asarray(noise_table)[n]
  num_spans = jnp.asarray(spans_table)[n]
  key_noise, key_keep = jax.random.split(rng)
  noise_len = _random_composition(key_noise, num_noise, num_spans, most, width)
  keep_len = _random_composition(key_keep, n - num_noise, num_spans, most, width)
  ends = jnp.cumsum(jnp.stack([keep_len, noise_len], axis=2).reshape(b, 2 * most), axis=1)
  pos = jnp.arange(width)[None, :]
  segment = jnp.sum(ends[:, None, :] <= pos[:, :, None], axis=2)  # [B, L]
  valid = pos < n[:, None]
  noise = valid & (segment % 2 == 1)
  span = segment // 2
  first = noise & ~jnp.pad(noise, ((0, 0), (1, 0)))[:, :-1]

  emit = valid & (~noise | first)
  idx = jnp.where(emit, jnp.cumsum(emit, axis=1) - 1, len_in)
  inputs = _scatter(len_in, idx, jnp.where(noise, sentinel_start + span, tokens))
  inputs = _with_eos(inputs, jnp.sum(emit, axis=1), nonempty)

  at = jnp.cumsum(noise, axis=1) - noise + span + 1  # a noise token's target column
  targets = _scatter(len_tgt, jnp.where(noise, at, len_tgt), tokens)
  sentinels = _scatter(len_tgt, jnp.where(first, at - 1, len_tgt), sentinel_start + span)
  targets = _with_eos(targets + sentinels, num_noise + num_spans, nonempty)
  return inputs, targets


def prefix_split(rng, tokens, *, rate: float):
  """UL2's S-denoiser (module docstring) -> (inputs [B, Li], targets [B, Lt]), widths from
  prefix_lengths(L, rate)."""
  tokens = jnp.asarray(tokens, jnp.int32)
  b, width = tokens.shape
  if not 0.0 < rate < 1.0:
    raise ValueError(f"prefix_split needs 0 < rate < 1; got rate={rate}.")
  len_in, len_tgt = prefix_lengths(width, rate)
  n, nonempty = _content(tokens)
  hi = jnp.asarray(_prefix_target_max(width, float(rate)))[n]
  u = jax.random.uniform(rng, (b,))
  t = jnp.where(n > 0, jnp.minimum(jnp.floor(u * hi).astype(jnp.int32), hi - 1) + 1, 0)
  pos = jnp.arange(width)[None, :]
  split = (n - t)[:, None]
  inputs = _scatter(len_in, jnp.where(pos < split, pos, len_in), tokens)
  in_target = (pos >= split) & (pos < n[:, None])
  targets = _scatter(len_tgt, jnp.where(in_target, pos - split, len_tgt), tokens)
  return inputs, _with_eos(targets, t, nonempty)


# ---- numpy inverses -------------------------------------------------------------------------

def _until_eos(row) -> list[int]:
  row = [int(x) for x in np.asarray(row)]
  return row[:row.index(EOS)] if EOS in row else [x for x in row if x]


def span_inverse(inputs, targets, *, sentinel_start: int, num_sentinels: int) -> list[list[int]]:
  """(inputs [B, Li], targets [B, Lt]) of span_corrupt -> each row's content (no EOS)."""
  out = []
  for inp, tgt in zip(np.asarray(inputs), np.asarray(targets)):
    spans, current = {}, None
    for x in _until_eos(tgt):
      if sentinel_start <= x < sentinel_start + num_sentinels:
        current = spans.setdefault(x, [])
      elif current is None:
        raise ValueError(f"targets {tgt.tolist()} do not start with a sentinel.")
      else:
        current.append(x)
    row = []
    for x in _until_eos(inp):
      row.extend(spans.pop(x) if x in spans else [x])
    if spans:
      raise ValueError(f"sentinels {sorted(spans)} of the targets are not in the inputs.")
    out.append(row)
  return out


def prefix_inverse(inputs, targets) -> list[list[int]]:
  """(inputs, targets) of prefix_split -> each row's content (no EOS)."""
  return [[int(x) for x in inp if x] + _until_eos(tgt)
          for inp, tgt in zip(np.asarray(inputs), np.asarray(targets))]
