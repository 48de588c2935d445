"""Language-aware sampling: temperature over the languages of a source or a mixture.

  src = sample_languages(open_source(data, "train"), column="language", temperature=3.3)

Each record's language is read once, at start-up, from `column` (input.language_column: a
record field / TFDS feature / table column; values are language codes). Language l of the
(whole) input is then drawn with probability

  q_l = m_l^(1/T) / sum_j m_j^(1/T)                        (T = input.language_temperature)

where m_l is language l's share without temperature. That is temperature ("exponentiated")
sampling as in XLM (Lample & Conneau 2019, alpha = 1/T = 0.5), XLM-R (Conneau et al. 2020,
alpha = 0.3) and mT5 (Xue et al. 2021, alpha = 0.3, i.e. T ~ 3.3): T = 1 keeps the natural
mix, larger T flattens it towards uniform (T = inf: uniform); T < 1 is refused.

Mixtures. With parts k of normalised weight p_k, holding n_k records of which n_{k,l} are in
language l, the mixture's natural share of language l is m_l = sum_k p_k n_{k,l} / n_k. The
temperature reshapes only the language marginal; inside a language the parts keep their
mixture proportions: P(part k, language l) = q_l * (p_k n_{k,l} / n_k) / m_l. So T = 1 is the
plain mixture, a single source is one part with p = 1, and parts of different languages (an
English part and a Japanese part) are rebalanced by T across the mixture.

Index-based and stateless, like mixture.MixtureSource: each (part, language) cell is a list
of record indices (source order), and the cells form a virtual epoch with
mixture.slots(cell sizes, cell probabilities): every cell owns >= n_cell consecutive slots,
slot j of a cell reads its record j mod n_cell, so every readable record is read at least
once per virtual epoch and a cell's share of it is its probability (up to rounding, at most
half a slot). The pipeline shuffles this virtual epoch as any source, so exact resume, the
per-process split and "epochs" carry over unchanged; the language stream is a function of
(seed, stream position) and the language column alone.

Scan cost (once per start, also on resume): tables (parquet / jsonl / csv) read only that
column (parquet: column-wise, cheap; jsonl / csv: the files are parsed again); other
sources (TFDS, tar) read every record once (TFDS: the serialized record, images not
decoded). The index map costs 4 bytes per record (8 for parts over 2^32 records). A record
with no language (missing / null / empty) is language UNKNOWN; a record that cannot be read
during the scan is left out of the map (the trainer would skip it anyway), counted in the
start-up log.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np

from big_mm.input import files
from big_mm.input import mixture
from big_mm.input import tables

UNKNOWN = "und"  # BCP 47's "undetermined": records without a language.


def check_temperature(temperature) -> float:
  """`temperature` as a float >= 1 (inf allowed); ValueError saying what is valid."""
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
      temperature >= 1):
    raise ValueError(
        f"input.language_temperature={temperature!r}: must be None (off) or a number >= 1 "
        f"(1: the natural language mix; mT5 / XLM-R use 1 / 0.3 ~ 3.3; inf: uniform). T < 1 "
        f"would favour high-resource languages beyond their natural share.")
  return float(temperature)


def temperature_probs(counts: dict[str, float], temperature: float) -> dict[str, float]:
  """{language: n_l} -> {language: n_l^(1/T) / sum_j n_j^(1/T)} (n_l = 0 gets 0)."""
  t = check_temperature(temperature)
  alpha = 0.0 if math.isinf(t) else 1.0 / t
  powered = {l: (float(n) ** alpha if n > 0 else 0.0) for l, n in counts.items()}
  total = sum(powered.values())
  if total <= 0:
    raise ValueError(f"No language has records: {counts}.")
  return {l: v / total for l, v in powered.items()}


def normalise(value) -> str:
  """A language value (str, bytes, None, numpy scalar) -> its code; UNKNOWN if none."""
  if isinstance(value, (bytes, np.bytes_)):
    value = bytes(value).decode("utf-8", "replace")
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  value = "" if value is None else str(value).strip()
  return value or UNKNOWN


def column_values(source, column: str) -> tuple[list[str | None], dict[str, int]]:
  """Every record's `column` value as a language code (UNKNOWN where missing, None where
  the record cannot be read) and {"unreadable": n, "missing": n}. Reads only that column
  where the source can (tables, slices of them); else every record (see the module
  docstring)."""
  if isinstance(source, files.SliceSource):
    values, counts = column_values(source.source, column)
    values = values[source.start:source.stop]
    return values, {"unreadable": sum(v is None for v in values),
                    "missing": sum(v == UNKNOWN for v in values)}
  if isinstance(source, tables.TableSource):
    values = [normalise(v) for v in source.column_values(column)]
  elif isinstance(source, mixture.MixtureSource):  # Its virtual epoch, slot by slot.
    parts = [column_values(part, column)[0] for part in source.sources]
    values = []
    for part, slots in zip(parts, source.slots):
      values += [part[j % len(part)] for j in range(slots)]
  else:
    values, fields = [], set()
    for i in range(len(source)):
      try:
        record = source[i]
      except Exception:  # pylint: disable=broad-except  Unreadable: the trainer skips it.
        values.append(None)
        continue
      fields.update(record)
      values.append(normalise(record.get(column)))
    if fields and column not in fields:
      raise ValueError(f"input.language_column={column!r}: the records of {source!r} have no "
                       f"such field; their fields: {sorted(fields)}. Name the field (TFDS "
                       f"feature, table column) that holds each record's language.")
  return values, {"unreadable": sum(v is None for v in values),
                  "missing": sum(v == UNKNOWN for v in values)}


def _index_dtype(n: int):
  return np.uint32 if n < 2**32 else np.int64


class LanguageSampledSource:
  """A source (or a mixture's parts) resampled by language; see the module docstring.

  Exposes what the pipeline reads of a mixture: `sources` / `names` (the parts),
  `source_of(index)` (the part an index reads) and `report()` (the realised mix).
  """

  def __init__(self, parts: Sequence[Any], weights: Sequence[float], names: Sequence[str],
               column: str, temperature: float, keep: Sequence[str] | None = None):
    self.sources, self.names = list(parts), list(names)
    self.column, self.temperature = column, check_temperature(temperature)
    self.keep = None if keep is None else tuple(keep)
    found = set()
    p = np.asarray(weights, np.float64) / float(sum(weights))
    cells, natural, self.scan = [], {}, []  # cells: (part, language, indices)
    for k, part in enumerate(self.sources):
      values, counts = column_values(part, column)
      self.scan.append(counts)
      readable = sum(v is not None for v in values)
      if not readable:
        raise ValueError(f"No record of {self.names[k]!r} could be read to find its language "
                         f"(input.language_column={column!r}).")
      by_language: dict[str, list[int]] = {}
      for i, v in enumerate(values):
        if v is not None:
          by_language.setdefault(v, []).append(i)
      found.update(by_language)
      for lang, idx in sorted(by_language.items()):
        if self.keep is not None and lang not in self.keep:
          continue
        share = p[k] * len(idx) / readable  # p_k n_{k,l} / n_k
        natural[lang] = natural.get(lang, 0.0) + share
        cells.append((k, lang, np.asarray(idx, _index_dtype(len(values))), share))
    if not natural:
      raise ValueError(f"input.languages={self.keep}: no record is in these languages; the "
                       f"data has {sorted(found)} (input.language_column={column!r}).")
    self.natural = natural
    self.target = temperature_probs(natural, self.temperature)
    self.cells = [(k, lang, idx) for k, lang, idx, _ in cells]
    self.cell_probs = [self.target[lang] * share / natural[lang]
                       for _, lang, _, share in cells]
    self.slots = mixture.slots([len(idx) for _, _, idx in self.cells], self.cell_probs)
    self._starts = np.cumsum([0] + self.slots)

  def __len__(self) -> int:
    return int(self._starts[-1])

  def _cell(self, index: int) -> int:
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for a virtual epoch of {len(self)}")
    return int(np.searchsorted(self._starts, int(index), side="right")) - 1

  def source_of(self, index: int) -> int:
    """Which part (position in the mixture; 0 for a single source) slot `index` reads."""
    return self.cells[self._cell(int(index))][0]

  def language_of(self, index: int) -> str:
    """The language of the record slot `index` reads."""
    return self.cells[self._cell(int(index))][1]

  def __getitem__(self, index: int) -> dict[str, Any]:
    c = self._cell(int(index))
    k, _, idx = self.cells[c]
    return self.sources[k][int(idx[(int(index) - int(self._starts[c])) % len(idx)])]

  def realised(self) -> dict[str, float]:
    """{language: its share of the virtual epoch} (the target up to slot rounding)."""
    out: dict[str, float] = {}
    for (_, lang, _), s in zip(self.cells, self.slots):
      out[lang] = out.get(lang, 0.0) + s / len(self)
    return out

  def report(self) -> str:
    """One line per language: records, natural share, target q_l, realised share, repeats."""
    records: dict[str, int] = {}
    slots: dict[str, int] = {}
    for (_, lang, idx), s in zip(self.cells, self.slots):
      records[lang] = records.get(lang, 0) + len(idx)
      slots[lang] = slots.get(lang, 0) + s
    realised = self.realised()
    lines = [f"language sampling (input.language_column={self.column!r}, "
             f"input.language_temperature={self.temperature:g}), virtual epoch {len(self)}:"]
    for lang in sorted(records, key=lambda l: -self.natural[l]):
      lines.append(f"  {lang}: {records[lang]} records, natural {self.natural[lang]:.4f}, "
                   f"target {self.target[lang]:.4f}, realised {realised[lang]:.4f}, each "
                   f"record read {slots[lang] / records[lang]:.2f}x per epoch")
    for name, counts in zip(self.names, self.scan):
      if counts["unreadable"] or counts["missing"]:
        lines.append(f"  {name}: {counts['unreadable']} records unreadable (left out), "
                     f"{counts['missing']} without a language ({UNKNOWN!r})")
    return "\n".join(lines)

  def __repr__(self):
    return (f"LanguageSampledSource({self.names}, column={self.column!r}, "
            f"T={self.temperature:g}, {len(self.cells)} cells)")


def sample_languages(source, column: str, temperature: float, name: str = "input.data",
                     keep: Sequence[str] | None = None) -> LanguageSampledSource:
  """`source` (a MixtureSource: its parts and weights) resampled by language, logged.
  keep (input.languages): only records in these languages are read (the others are left
  out; the natural shares are then those of the kept languages)."""
  if not isinstance(column, str) or not column:
    raise ValueError(f"input.language_temperature needs input.language_column (the field "
                     f"holding each record's language), got {column!r}.")
  if isinstance(source, mixture.MixtureSource):
    out = LanguageSampledSource(source.sources, source.weights, source.names, column,
                                temperature, keep)
  else:
    out = LanguageSampledSource([source], [1.0], [str(name)], column, temperature, keep)
  logging.info("%s", out.report())
  return out
