"""Caption metrics against hand-computed values (BLEU: Papineni et al.'s own example)."""
import math

import pytest

from big_mm.evaluators import caption_metrics as cm


def test_tokenize_lowercases_and_drops_punctuation():
  assert cm.tokenize("A Dog's toy,  RED!") == ["a", "dog", "s", "toy", "red"]


def test_bleu_modified_unigram_precision_from_the_paper():
  # Papineni et al. 2002, section 2.1: "the" x7 against two references -> 2/7 (BP = 1: the
  # closest reference length is 7).
  refs = [["The cat is on the mat.", "There is a cat on the mat."]]
  assert cm.bleu(["the the the the the the the"], refs, max_n=1) == pytest.approx(2 / 7)


def test_bleu4_by_hand():
  # p1..p4 = 5/6, 3/5, 2/4, 1/3; equal lengths -> BP = 1.
  score = cm.bleu(["the cat sat on the mat"], [["the cat sat on a mat"]])
  assert score == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)


def test_bleu_brevity_penalty_and_corpus_pooling():
  assert cm.bleu(["the cat"], [["the cat sat on the mat"]], max_n=2) == pytest.approx(
      math.exp(1 - 6 / 2))
  # Corpus level: counts pool over examples (a mean of sentence scores would be 0.5).
  hyps, refs = ["a b c d", "e f g h"], [["a b c d"], ["e f g x"]]
  expected = (7 / 8 * 5 / 6 * 3 / 4 * 1 / 2) ** 0.25
  assert cm.bleu(hyps, refs) == pytest.approx(expected)


def test_bleu_identical_corpus_is_one_and_no_match_is_zero():
  caps = ["a photo of the number seven", "handwritten 7 on a page"]
  assert cm.bleu(caps, [[c] for c in caps]) == pytest.approx(1.0)
  assert cm.bleu(["x y z w"], [["a b c d"]]) == 0.0


def test_cider_d_exact_matches_by_hand():
  # Two examples with disjoint words: every n-gram has idf log(2) - log(1); an exact match has
  # cosine 1 at each order it has, so 3 words score 10 * 3/4 (no 4-gram), 4 words 10.
  assert cm.cider_d(["a red cat", "two blue dogs"],
                    [["a red cat"], ["two blue dogs"]]) == pytest.approx(7.5)
  assert cm.cider_d(["a small red cat", "two big blue dogs"],
                    [["a small red cat"], ["two big blue dogs"]]) == pytest.approx(10.0)
  # A one-example corpus: idf = log(1) - log(1) = 0 everywhere, so even a match scores 0.
  assert cm.cider_d(["a red cat"], [["a red cat"]]) == 0.0


def test_cider_d_clipping_and_length_penalty_by_hand():
  # Example 1: hyp "red cat" vs ref "a red cat" (all idf = log 2 =: L, which cancels):
  # unigrams 2L^2 / (sqrt2 L * sqrt3 L), bigrams L^2 / (L * sqrt2 L), no trigrams in the hyp;
  # bigram counts 1 vs 2 -> penalty exp(-1 / (2 * 36)).
  # Example 2: "dog dog dog" vs "dog": clipped min(3L, L) * L / (3L * L) = 1/3 at n=1; bigrams
  # ("dog dog" x2 vs none) 0; lengths 2 vs 0 -> penalty exp(-4 / 72).
  first = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
  second = 10 * (1 / 3) / 4 * math.exp(-4 / 72)
  score = cm.cider_d(["red cat", "dog dog dog"], [["a red cat"], ["dog"]])
  assert score == pytest.approx((first + second) / 2)


def test_cider_d_averages_over_references():
  # Example 1 matches its first reference (3 orders, 10 * 3/4 each with no shared n-gram)
  # and shares nothing with its second ("four five six" is only in example 1's references,
  # but no hyp n-gram): (7.5 + 0) / 2. Example 2 is an exact match of "x y z": 7.5.
  score = cm.cider_d(["one two three", "x y z"],
                     [["one two three", "four five six"], ["x y z"]])
  assert score == pytest.approx((7.5 / 2 + 7.5) / 2)


def test_exact_match_ignores_case_and_punctuation():
  hyps = ["Handwritten 7.", "the digit seven", "a seven"]
  refs = [["handwritten 7"], ["a photo", "The digit seven"], ["seven"]]
  assert cm.exact_match(hyps, refs) == pytest.approx(2 / 3)


def test_names_only_needs_the_right_class_alone_as_whole_words():
  names = [["zero", "0"], ["one", "1"], ["seven", "7"], ["ice cream"]]
  assert cm.names_only("a photo of the number seven", names, 2)
  assert cm.names_only("handwritten 7", names, 2)
  assert not cm.names_only("seven or one", names, 2)        # names another class too
  assert not cm.names_only("someone wrote this", names, 1)  # "one" only inside a word
  assert cm.names_only("an ice cream", names, 3)
  assert not cm.names_only("ice and cream", names, 3)


def test_mismatched_lengths_fail_clearly():
  with pytest.raises(ValueError, match="one list of references per hypothesis"):
    cm.bleu(["a", "b"], [["a"]])
