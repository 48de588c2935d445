"""Caption metrics: corpus BLEU-4, CIDEr-D and exact match (pure Python, no dependencies).

Tokenisation (`tokenize`): lowercase, every character that is not a letter, digit, `_` or
whitespace becomes a space, then split on whitespace ("A dog's toy." -> a, dog, s, toy). The
coco-caption toolkit runs the PTB tokenizer first; on captions without contractions the two agree.

`hypotheses` is a list of N generated strings, `references` a list of N lists of reference
strings (any number per example, at least one).
"""
from __future__ import annotations

import collections
import math
import re
from typing import Sequence

_NON_WORD = re.compile(r"[^\w\s]")


def tokenize(text: str) -> list[str]:
  return _NON_WORD.sub(" ", text.lower()).split()


def _ngrams(words: Sequence[str], max_n: int) -> collections.Counter:
  return collections.Counter(tuple(words[i:i + n]) for n in range(1, max_n + 1)
                             for i in range(len(words) - n + 1))


def _check(hypotheses, references) -> None:
  if len(hypotheses) != len(references):
    raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists; "
                     "give one list of references per hypothesis.")
  if any(not refs for refs in references):
    raise ValueError("Every hypothesis needs at least one reference.")


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
  """Corpus-level BLEU (Papineni et al. 2002), unsmoothed, in [0, 1].

  Clipped n-gram matches (each n-gram counts at most as often as in the reference that has the
  most of it) and candidate n-gram counts are summed over the corpus, n = 1..max_n; the score is
  their geometric mean times the brevity penalty exp(1 - r / c) when c < r, with c the total
  candidate length and r the total of the reference lengths closest to each candidate's (the
  shorter one on ties, as coco-caption). 0 if some order has no match at all.
  """
  _check(hypotheses, references)
  matches, totals = [0] * max_n, [0] * max_n
  hyp_len = ref_len = 0
  for hyp, refs in zip(hypotheses, references):
    hyp_words = tokenize(hyp)
    ref_words = [tokenize(r) for r in refs]
    hyp_len += len(hyp_words)
    ref_len += min((abs(len(r) - len(hyp_words)), len(r)) for r in ref_words)[1]
    max_ref = collections.Counter()
    for r in ref_words:
      max_ref |= _ngrams(r, max_n)  # elementwise max over references
    for gram, count in _ngrams(hyp_words, max_n).items():
      matches[len(gram) - 1] += min(count, max_ref[gram])
      totals[len(gram) - 1] += count
  if hyp_len == 0 or min(matches) == 0:
    return 0.0
  log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
  brevity = min(0.0, 1.0 - ref_len / hyp_len)
  return math.exp(log_precision + brevity)


def cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4,
            sigma: float = 6.0) -> float:
  """CIDEr-D (Vedantam et al. 2015) as coco-caption's CiderD scorer computes it.

  Per example and order n: TF-IDF vectors of the n-grams (idf = log(N) - log(df), df = the
  number of examples whose references contain the n-gram, at least 1; N = number of examples,
  so a one-example corpus scores 0); similarity to each reference = sum over the hypothesis'
  n-grams of min(hyp, ref) * ref (clipping), divided by both vector norms, times the Gaussian
  length penalty exp(-delta^2 / (2 sigma^2)). delta is the difference in bigram counts (words -
  1, as in the reference code). Averaged over n and references, times 10, then over examples.
  """
  _check(hypotheses, references)
  refs_counts = [[_ngrams(tokenize(r), max_n) for r in refs] for refs in references]
  doc_freq = collections.Counter()
  for counts in refs_counts:
    doc_freq.update(set().union(*counts))
  log_n = math.log(len(hypotheses)) if hypotheses else 0.0

  def tfidf(counts):
    vec = [{} for _ in range(max_n)]
    for gram, tf in counts.items():
      vec[len(gram) - 1][gram] = tf * (log_n - math.log(max(1.0, doc_freq[gram])))
    norms = [math.sqrt(sum(v * v for v in order.values())) for order in vec]
    bigrams = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vec, norms, bigrams

  scores = []
  for hyp, counts in zip(hypotheses, refs_counts):
    hyp_vec, hyp_norms, hyp_len = tfidf(_ngrams(tokenize(hyp), max_n))
    total = 0.0
    for ref in counts:
      ref_vec, ref_norms, ref_len = tfidf(ref)
      penalty = math.exp(-float(hyp_len - ref_len) ** 2 / (2 * sigma ** 2))
      for n in range(max_n):
        dot = sum(min(v, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0)
                  for g, v in hyp_vec[n].items())
        if hyp_norms[n] and ref_norms[n]:
          dot /= hyp_norms[n] * ref_norms[n]
        total += dot * penalty
    scores.append(10.0 * total / max_n / len(counts))
  return sum(scores) / len(scores) if scores else 0.0


def exact_match(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """Fraction of hypotheses equal to one of their references (after `tokenize`)."""
  _check(hypotheses, references)
  if not hypotheses:
    return 0.0
  hits = sum(tokenize(h) in [tokenize(r) for r in refs] for h, refs in zip(hypotheses, references))
  return hits / len(hypotheses)


def names_only(caption: str, names: Sequence[Sequence[str]], label: int) -> bool:
  """Whether `caption` names class `label` and no other class, as whole words.

  names[c] lists the alternative names of class c (e.g. ("seven", "7")); a multi-word name must
  appear as consecutive words.
  """
  words = tokenize(caption)

  def mentions(name):
    name = tokenize(name)
    return any(words[i:i + len(name)] == name for i in range(len(words) - len(name) + 1))

  named = [any(mentions(n) for n in alternatives) for alternatives in names]
  return named[label] and sum(named) == 1
