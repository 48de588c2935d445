"""Span corruption and UL2's sequential split (big_mm/objectives/denoising.py): exact inverses,
T5's counts, the randomness of the spans, static shapes, short rows."""
import jax
import numpy as np
import pytest

from big_mm.objectives import denoising

SENTINEL = 200  # sentinel ids start after a 200-piece vocabulary
K = 40          # sentinels
CONFIGS = ((3, 0.15), (8, 0.15), (3, 0.5), (8, 0.5), (64, 0.15), (64, 0.5), (1, 0.3))


def _rows(num, width, lengths, seed=0, eos=True):
  """Rows of `width`: content of a length drawn from `lengths` (ids 2..199), EOS, pads; a row
  whose content fills the width has no EOS."""
  rng = np.random.default_rng(seed)
  rows = np.zeros((num, width), np.int32)
  content = []
  for i in range(num):
    n = int(rng.choice(lengths))
    rows[i, :n] = rng.integers(2, SENTINEL, n)
    if eos and n < width:
      rows[i, n] = denoising.EOS
    content.append(rows[i, :n].tolist())
  return rows, content


def _corrupt(mean_span, rate):
  return jax.jit(lambda r, t: denoising.span_corrupt(r, t, mean_span=mean_span, rate=rate,
                                                     sentinel_start=SENTINEL, num_sentinels=K))


@pytest.mark.parametrize("mean_span,rate", CONFIGS)
def test_span_corrupt_inverts_exactly_with_t5_counts(mean_span, rate):
  width = 24
  rows, content = _rows(300, width, range(0, width + 1), seed=int(rate * 100) + mean_span)
  inputs, targets = _corrupt(mean_span, rate)(jax.random.key(0), rows)
  assert (inputs.shape[1], targets.shape[1]) == denoising.output_lengths(width, mean_span, rate)
  assert denoising.span_inverse(inputs, targets, sentinel_start=SENTINEL,
                                num_sentinels=K) == content
  noise, spans = denoising.span_counts(width, mean_span, rate)
  for inp, tgt, c in zip(np.asarray(inputs), np.asarray(targets), content):
    n = len(c)
    sent_t = [x - SENTINEL for x in tgt if x >= SENTINEL]
    sent_i = [x - SENTINEL for x in inp if x >= SENTINEL]
    assert sent_t == sent_i == list(range(spans[n]))  # sentinels 0..k-1 in order, both sides
    assert np.sum(tgt != 0) == noise[n] + spans[n] + 1  # tokens, sentinels, EOS
    assert np.sum(inp != 0) == n - noise[n] + spans[n] + 1
    if n >= 2:  # T5: the content starts with a kept token and ends inside a noise span
      assert inp[0] == c[0] and inp[np.sum(inp != 0) - 2] >= SENTINEL


def test_t5_counts_follow_the_formula():
  noise, spans = denoising.span_counts(40, 3.0, 0.15)
  assert (noise[0], noise[1], spans[1]) == (0, 0, 0)
  assert (noise[2], spans[2]) == (1, 1)      # clipped to [1, n - 1]
  assert (noise[20], spans[20]) == (3, 1)    # round(3.0), round(1.0)
  assert (noise[40], spans[40]) == (6, 2)
  assert denoising.span_counts(10, 1.0, 0.9)[1][10] == 1  # spans <= n - num_noise = 1
  assert denoising.output_lengths(40, 3.0, 0.15) == (40 - 6 + 2 + 1, 6 + 2 + 1)


def test_corruption_rate_and_span_lengths_in_expectation():
  """2,000 rows of 30..63 tokens. The rate and mean span length are fixed by rounding, so they
  sit within the rounding bounds; the spans' placement is random: by the symmetry of a uniform
  random composition every span (and kept run) has the same expected length, count / spans."""
  width, mean_span, rate = 64, 3, 0.5
  rows, content = _rows(2000, width, range(30, 64), seed=1)
  inputs, targets = _corrupt(mean_span, rate)(jax.random.key(1), rows)
  inputs, targets = np.asarray(inputs), np.asarray(targets)
  n = np.array([len(c) for c in content])
  noise = np.sum((targets != 0) & (targets < SENTINEL), axis=1) - 1  # less the EOS
  spans = np.sum(targets >= SENTINEL, axis=1)
  # |round(x) - x| <= 0.5 per row: the rate is within 0.5 / 30 of its setting.
  assert abs(noise.sum() / n.sum() - rate) <= 0.5 / 30
  # spans = round(noise / 3) >= 5 here, so the mean span length is within 10% of 3.
  assert abs(noise.sum() / spans.sum() - mean_span) <= 0.1 * mean_span
  first_span = np.argmax(targets[:, 1:] >= SENTINEL, axis=1)  # tokens before sentinel 1
  last_span = noise - (np.argmax(targets == SENTINEL + spans[:, None] - 1, axis=1) - spans + 1)
  first_kept = np.argmax(inputs >= SENTINEL, axis=1)
  for got, expected, items in ((first_span, noise / spans, noise),
                               (last_span, noise / spans, noise),
                               (first_kept, (n - noise) / spans, n - noise)):
    dev = got - expected
    # 4 standard errors of the mean deviation (the composition's spread per row, measured).
    assert abs(dev.mean()) < 4 * dev.std() / np.sqrt(len(dev)), (dev.mean(), dev.std())
    assert np.all((got >= 1) & (got <= items - spans + 1))


def test_short_rows_static_shapes_and_determinism():
  rows = np.array([[7, 1, 0], [7, 8, 1], [7, 0, 0], [1, 0, 0], [0, 0, 0], [7, 8, 9]], np.int32)
  corrupt = _corrupt(3, 0.5)
  inputs, targets = corrupt(jax.random.key(0), rows)
  np.testing.assert_array_equal(inputs[:5, :3], [[7, 1, 0], [7, SENTINEL, 1], [7, 1, 0],
                                                 [1, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(targets[:5, :3], [[1, 0, 0], [SENTINEL, 8, 1], [1, 0, 0],
                                                  [1, 0, 0], [0, 0, 0]])
  assert denoising.span_inverse(inputs, targets, sentinel_start=SENTINEL,
                                num_sentinels=K)[5] == [7, 8, 9]
  again = corrupt(jax.random.key(0), rows)
  np.testing.assert_array_equal(again[0], inputs)
  np.testing.assert_array_equal(again[1], targets)
  rows, _ = _rows(64, 16, range(4, 17), seed=3)
  a = np.asarray(corrupt(jax.random.key(0), rows)[1])
  b = np.asarray(corrupt(jax.random.key(1), rows)[1])
  assert not np.array_equal(a, b)
  # Static shapes: the widths depend on (L, mean_span, rate) alone, not the rows.
  shapes = jax.eval_shape(lambda r: denoising.span_corrupt(
      jax.random.key(0), r, mean_span=3, rate=0.5, sentinel_start=SENTINEL, num_sentinels=K),
      jax.ShapeDtypeStruct((5, 16), np.int32))
  assert [s.shape for s in shapes] == [(5, w) for w in denoising.output_lengths(16, 3, 0.5)]
  one = _corrupt(3, 0.5)(jax.random.key(0), np.array([[9], [0]], np.int32))
  np.testing.assert_array_equal(one[0], [[9, 1], [0, 0]])
  np.testing.assert_array_equal(one[1], [[1], [0]])
  with pytest.raises(ValueError, match="up to 11 noise spans.*10 sentinels"):
    denoising.span_corrupt(jax.random.key(0), rows[:, :16].repeat(4, axis=1), mean_span=3,
                           rate=0.5, sentinel_start=SENTINEL, num_sentinels=10)


def test_prefix_split_inverts_and_targets_about_rate():
  width, rate = 64, 0.25
  rows, content = _rows(2000, width, list(range(0, 4)) + list(range(30, 64)), seed=2)
  split = jax.jit(lambda r, t: denoising.prefix_split(r, t, rate=rate))
  inputs, targets = split(jax.random.key(0), rows)
  assert (inputs.shape[1], targets.shape[1]) == denoising.prefix_lengths(width, rate)
  assert denoising.prefix_inverse(inputs, targets) == content
  n = np.array([len(c) for c in content])
  t = np.sum(np.asarray(targets) != 0, axis=1) - 1  # less the EOS
  kept = np.sum(np.asarray(inputs) != 0, axis=1)
  assert np.all(kept + t == n)
  long = n >= 30
  assert np.all((t[long] >= 1) & (kept[long] >= 1))
  np.testing.assert_array_equal(t[n == 1], 1)  # one token: it is the target
  # t is uniform on 1..hi, hi = round(2 * rate * n): mean (t - 1) / (hi - 1) is 1/2 (4 standard
  # errors of a uniform's 0.29 spread over ~1,800 rows: 0.03), and t / n is about the rate.
  hi = np.round(2 * rate * n[long])
  assert abs(np.mean((t[long] - 1) / (hi - 1)) - 0.5) < 0.03
  assert abs(np.mean(t[long] / n[long]) - rate) < 0.02
  again = split(jax.random.key(0), rows)
  np.testing.assert_array_equal(again[1], targets)
