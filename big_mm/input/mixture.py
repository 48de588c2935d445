"""A weighted mixture of sources as one random-access source (a "virtual epoch").

With weights normalised to p_k and sizes n_k, the virtual epoch has length
L = max_k ceil(n_k / p_k) rounded up so that every source fits, and source k owns
s_k = round(p_k * L) >= n_k consecutive slots; slot j of source k reads its example
j mod n_k. Every example of every source is read at least once per virtual epoch and
source k makes a fraction s_k / sum(s) ~= p_k of it; the source with the largest
n_k / p_k is read exactly once, the others are repeated (examples 0..s_k-n_k-1 once more).
The pipeline shuffles the whole virtual epoch, so the mix holds within every batch in
expectation. The mapping is stateless, so the pipeline's exact resume and per-process
sharding carry over; "epochs" (total_epochs, every_epochs) count virtual epochs.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


def slots(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
  """Slots per source in one virtual epoch (see the module docstring)."""
  total = float(sum(weights))
  if any(n <= 0 for n in sizes):
    raise ValueError(f"Every source of a mixture needs examples; sizes are {list(sizes)}.")
  # The 1e-9 keeps float noise (e.g. 3 / 0.3 = 10.000000000000002) from adding a slot.
  length = max(math.ceil(n * total / w - 1e-9) for n, w in zip(sizes, weights))
  return [max(n, round(w * length / total)) for n, w in zip(sizes, weights)]


class MixtureSource:
  """Sources mixed by weight; index i of the virtual epoch -> an example of one source."""

  def __init__(self, sources: Sequence[Any], weights: Sequence[float],
               names: Sequence[str] | None = None):
    if len(sources) != len(weights) or not sources:
      raise ValueError("A mixture needs one weight per source, and at least one source.")
    self.sources, self.weights = list(sources), [float(w) for w in weights]
    self.names = list(names) if names else [repr(s) for s in sources]
    self.sizes = [len(s) for s in self.sources]
    self.slots = slots(self.sizes, self.weights)
    self._starts = np.cumsum([0] + self.slots)

  def __len__(self) -> int:
    return int(self._starts[-1])

  def source_of(self, index: int) -> int:
    """Which source (position in the mixture) virtual-epoch slot `index` reads."""
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for a virtual epoch of {len(self)}")
    return int(np.searchsorted(self._starts, int(index), side="right")) - 1

  def __getitem__(self, index: int) -> dict[str, Any]:
    k = self.source_of(int(index))
    return self.sources[k][(int(index) - int(self._starts[k])) % self.sizes[k]]

  def __repr__(self):
    parts = ", ".join(f"{n}: {w:g} ({s} slots)"
                      for n, w, s in zip(self.names, self.weights, self.slots))
    return f"MixtureSource({parts})"
