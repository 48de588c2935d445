"""Evaluators: recall@k arithmetic, zero-shot class embeddings, whole-split embedding."""
import numpy as np

from big_mm.evaluators import retrieval, zeroshot


def test_recall_at_k_counts_rank_of_the_true_pair():
  sim = np.array([[0.9, 0.1, 0.0],    # query 0: right one first
                  [0.8, 0.5, 0.1],    # query 1: right one second
                  [0.7, 0.6, 0.1]])   # query 2: right one third
  assert retrieval.recall_at_k(sim, (1, 2, 3)) == {1: 1 / 3, 2: 2 / 3, 3: 1.0}


class _FakeEmbedder:
  """Text 'embedding' = one-hot of the first token, so prompts of a class average to it."""

  def texts(self, params, tokens, batch_size):
    del params, batch_size
    return np.eye(8)[tokens[:, 0]]


class _FakeTokenizer:
  def encode(self, texts, length):
    ids = {"zero": 1, "one": 2, "two": 3}
    return np.array([[ids[t.split()[-1]]] + [0] * (length - 1) for t in texts], np.int32)


def test_class_embeddings_average_templates_and_normalise():
  z = zeroshot.class_embeddings(_FakeEmbedder(), None, _FakeTokenizer(), ["zero", "one", "two"],
                                ["a {}", "the digit {}"], text_len=4, batch_size=8)
  assert z.shape == (3, 8)
  np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0)
  assert list(np.argmax(z, axis=-1)) == [1, 2, 3]
