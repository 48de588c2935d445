"""Image <-> text retrieval on held-out image-caption data: recall@k in both directions.

The COCO / Flickr30k protocol: every caption of every image is a candidate (the first
`captions_per_image`, 5 by default, of each); image->text is a hit at k if any of the
image's own captions ranks within the top k, text->image if the caption's image does. With
one caption per image this is the usual paired recall.

Ties are broken uniformly at random and the metric is its expectation: a right candidate
tied with wrong ones gets the matching fraction of a hit, so collapsed (all-equal)
embeddings score chance level, never 1. Duplicate captions (identical text, hence identical
embeddings) tie likewise: an image whose caption also describes 2 other images scores 1/3
at k=1 in image->text. Non-finite embeddings are an error.

With labels in the split, class_R@k counts a hit if a candidate with the query's label ranks
within the top k (the top caption's image shows the same class, for k=1).

A Matryoshka objective (objective.matryoshka_dims) adds every recall at each smaller prefix dim
d of the embeddings (re-normalised), named with the suffix @d{d}: img2txt/R@1@d32.

An objective with its own similarity (FILIP: `common.own_similarity`) ranks by it: img2txt by
its image->text similarity, txt2img by its text->image one (logged at every evaluation).

Per language (`languages`, e.g. ("en", "ja") on data/emoji_multilingual.py's test splits): the
captions in language L are the text column "text_L" (or text_column with "{lang}" in it, e.g.
"captions_{lang}"); the images are embedded once. Every metric is reported per language,
<L>/img2txt/R@1, <L>/num_captions, ..., and as its unweighted mean over the languages,
mean/img2txt/R@1, .... With cross_lingual (default) and 2+ languages, text->text retrieval
across languages too: each caption in A queries the captions in B, a hit when one of the same
image's ranks within the top k (with the tie rule above): <A>-><B>/R@k for every ordered pair,
and cross_lingual/R@k, the mean over the pairs (at the full embedding dim, by the dot product;
an objective with its own image-text similarity needs cross_lingual=False).

Between any two modalities (`modalities=(a, b)`, e.g. ("audio", "image"); default ("image",
"text"), the protocol above): the split is read with input.modalities = (a, b) (binding mode
for audio, points, vec_*: pp strings from input.pp_modalities, overridden per modality by the
evaluator's pp_modalities), one item of each per record (captions_per_image is not used), and
only records with both present count. Each is embedded by its tower (objective.embed) and
ranked by the dot product: {a}2{b}/R@k and {b}2{a}/R@k (audio2image/R@1, image2audio/R@1),
class_R@k with labels (same label = hit: emergent audio<->image retrieval of spoken and
written digits), at each Matryoshka prefix dim too; num_examples (records used) and
num_skipped (records of the split without both).
"""
from __future__ import annotations

import functools
import logging

import numpy as np

from big_mm import config as config_lib
from big_mm import modalities as modalities_lib
from big_mm import sharding
from big_mm.evaluators import common, prompts
from big_mm.input import pipeline

_QUERY_CHUNK = 1024  # Queries scored at once: bounds the [chunk, candidates] host arrays.


def expected_hits(sim: np.ndarray, positive: np.ndarray, ks) -> np.ndarray:
  """[len(ks), Q] expected hit@k of each query (rows of sim [Q, K], candidates in columns;
  positive [Q, K] marks each query's right candidates, at least one per row) when ties are
  broken uniformly at random."""
  best = np.max(np.where(positive, sim, -np.inf), axis=1, keepdims=True)
  above = np.sum((sim > best) & ~positive, axis=1)  # Wrong candidates surely ranked higher.
  tied_wrong = np.sum((sim == best) & ~positive, axis=1)
  tied_right = np.sum((sim == best) & positive, axis=1)
  out = []
  for k in ks:
    # The first of the tied right candidates lands in one of `slots` free top-k places unless
    # all of them go to tied wrong ones: P(miss) = prod_i<slots (t - i) / (t + r - i).
    slots = np.clip(k - above, 0, None)
    miss = np.ones(len(sim))
    for i in range(int(np.max(slots, initial=0))):
      factor = np.maximum(tied_wrong - i, 0) / np.maximum(tied_wrong + tied_right - i, 1)
      miss = np.where(i < slots, miss * factor, miss)
    out.append(1.0 - miss)
  return np.stack(out)


def recall_at_k(sim: np.ndarray, positive: np.ndarray, ks) -> dict[int, float]:
  """{k: mean expected hit@k} over the queries (see expected_hits)."""
  return {k: float(v) for k, v in zip(ks, expected_hits(sim, positive, ks).mean(axis=1))}


def _recalls(queries, candidates, positive_of, ks, score=None) -> dict[int, float]:
  """recall_at_k of sim = score(queries, candidates) (default queries @ candidates.T),
  computed in chunks of queries; positive_of(rows) -> bool [len(rows), K]."""
  score = score or (lambda q, c: q @ c.T)
  hits = []
  for start in range(0, len(queries), _QUERY_CHUNK):
    rows = np.arange(start, min(start + _QUERY_CHUNK, len(queries)))
    hits.append(expected_hits(score(queries[rows], candidates), positive_of(rows), ks))
  return {k: float(v) for k, v in zip(ks, np.concatenate(hits, axis=1).mean(axis=1))}


def check_finite(name, what, z):
  bad = ~np.all(np.isfinite(z), axis=-1)
  if bad.any():
    raise FloatingPointError(
        f"evals.{name} (retrieval): {int(bad.sum())} of {len(z)} {what} embeddings are not "
        f"finite (NaN/inf), so no recall can be computed. Check the parameters (the training "
        f"loss and train.nan_policy) and the eval inputs (evals.{name}.pp_image should give "
        f"the value range the model was trained on).")


def _recall_metrics(zimg, ztxt, owner, labels, ks, scores=None,
                    names=("img2txt", "txt2img")) -> dict[str, float]:
  """{"img2txt/R@k", "txt2img/R@k" (and class_R@k with labels)}; owner [M]: each caption's
  image row; scores(zimg, ztxt, direction) -> [Ni, Nt] (default: the dot product); names: the
  two directions' metric names."""
  scores = scores or (lambda zi, zt, direction: zi @ zt.T)
  out = {}
  # A right candidate has the query's key: its image index, or for class_R@k its label.
  for prefix, key in (("", np.arange(len(zimg))), ("class_", labels)):
    if key is None:
      continue
    img2txt = _recalls(zimg, ztxt, lambda rows: key[rows][:, None] == key[owner][None], ks,
                       lambda zi, zt: scores(zi, zt, "img2txt"))
    txt2img = _recalls(ztxt, zimg, lambda rows: key[owner[rows]][:, None] == key[None], ks,
                       lambda zt, zi: scores(zi, zt, "txt2img").T)
    for direction, recalls in zip(names, (img2txt, txt2img)):
      out.update({f"{direction}/{prefix}R@{k}": value for k, value in recalls.items()})
  return out


def check_modality_names(key: str, names, count: int | None = None) -> tuple[str, ...]:
  """names as a tuple of distinct registered modality names (`count` of them, or >= 2);
  ConfigError naming `key` otherwise."""
  valid = tuple(modalities_lib.MODALITIES)
  want = f"{count}" if count else "at least 2"
  if (isinstance(names, str) or not isinstance(names, (tuple, list))
      or len(set(names)) != len(names) or not (len(names) == count if count else
                                               len(names) >= 2)):
    raise config_lib.ConfigError(f"{key} must be a tuple of {want} different modalities of "
                                 f"{list(valid)}, e.g. ('audio', 'image'); got {names!r}.")
  for m in names:
    config_lib.choice(f"{key} entry", m, valid)
  return tuple(names)


def check_pp_modalities(key: str, value) -> None:
  """value: None or {registered modality: pp string}; ConfigError naming `key` otherwise."""
  if value is None:
    return
  if not prompts.is_mapping(value) or not all(isinstance(v, str) for v in value.values()):
    raise config_lib.ConfigError(f"{key} must be None or {{modality: pp string}}, e.g. "
                                 f"{{'audio': 'decode_audio(16000)|log_mel(...)'}}; got "
                                 f"{value!r}.")
  for m in value.keys():
    config_lib.choice(f"{key} key", m, tuple(modalities_lib.MODALITIES))


def check_towers(key: str, objective, names) -> None:
  """ConfigError starting with `key` (the config key and its value) if the objective's towers
  model has no tower for one of names (objectives without model.towers are not checked)."""
  towers = getattr(getattr(objective, "model", None), "towers", None)
  missing = [m for m in names if towers is not None and m not in towers]
  if missing:
    raise config_lib.ConfigError(
        f"{key}: the model has no tower for {missing} (model.towers: "
        f"{sorted(towers)}); evaluate modalities the model embeds, or add a tower for "
        f"{missing} to model.towers.")


def modality_input(name: str, input_cfg, ev, names):
  """The eval input config reading modalities `names` (input.modalities = names, binding mode
  with audio / points / vec_*), their pp strings input.pp_modalities overridden by
  evals.{name}.pp_modalities. ConfigError for a pp-shaped modality without one."""
  cfg = input_cfg.copy_and_resolve_references()
  pps = {**dict(cfg.get("pp_modalities") or {}), **dict(ev.get("pp_modalities") or {})}
  shaped = [m for m in names if modalities_lib.get(m).kind in modalities_lib.PP_SHAPED]
  for m in shaped:
    if m not in pps:
      raise config_lib.ConfigError(
          f"evals.{name} reads {m!r}, which needs a pp string: set evals.{name}.pp_modalities"
          f"={{{m!r}: ...}} (or input.pp_modalities[{m!r}]).")
  with cfg.unlocked():
    cfg.modalities = tuple(names)
    cfg.pp_modalities = {m: pps[m] for m in shaped} or None
  return cfg


def embed_modalities(context, params, input_cfg, batch_size: int, names) -> dict:
  """Embeds modalities `names` over a whole split (input_cfg from modality_input), in order:
  {m: z [N, D]} over the N records that have all of them (real rows with `<m>_present` 1),
  "label" [N] where the split has labels, and "num_skipped" (the split's other records)."""
  mesh = context.mesh
  batches = pipeline.make_eval_batches(input_cfg, input_cfg.split,
                                       common.round_batch(batch_size, mesh),
                                       sharding.batch_sharding(mesh))
  parts = {m: [] for m in (*names, "label")}
  for batch in batches:
    keep = np.asarray(common.gather(batch["mask"])).astype(bool)
    for m in names:
      if modalities_lib.present_key(m) in batch:  # Required modalities have no flag.
        keep &= np.asarray(common.gather(batch[modalities_lib.present_key(m)])).astype(bool)
    for m in names:
      z = context.embedder.embed(m)(params, modalities_lib.model_input(batch, m))
      parts[m].append(common.gather(z)[keep])
    if "label" in batch:
      parts["label"].append(common.gather(batch["label"])[keep])
  out = {k: np.concatenate(v) for k, v in parts.items() if v}
  out["num_skipped"] = batches.num_examples - len(out[names[0]])
  return out


class Retrieval(common.Evaluator):
  """recall@k in both directions; see the module docstring."""
  # COCO / Flickr30k: 5 captions per image.
  DEFAULTS = dict(common.DEFAULTS, ks=(1, 5, 10), captions_per_image=5, languages=(),
                  cross_lingual=True, modalities=("image", "text"), pp_modalities=None)

  @staticmethod
  def validate(name, ev):
    common.int_at_least(f"evals.{name}.captions_per_image", ev["captions_per_image"], 1)
    pair = check_modality_names(f"evals.{name}.modalities", ev["modalities"], 2)
    check_pp_modalities(f"evals.{name}.pp_modalities", ev["pp_modalities"])
    languages = prompts.languages(f"evals.{name}.languages", ev["languages"])
    if languages and pair != ("image", "text"):
      raise config_lib.ConfigError(
          f"evals.{name}.languages is for image-text retrieval; with modalities={pair!r} "
          f"leave it empty (one evaluator per language's data instead).")
    if not isinstance(ev["cross_lingual"], bool):
      raise config_lib.ConfigError(f"evals.{name}.cross_lingual must be True or False, got "
                                   f"{ev['cross_lingual']!r}.")
    column = ev["text_column"]
    if column is not None and ("{lang}" in column) != bool(languages):
      raise config_lib.ConfigError(
          f"evals.{name}.text_column={column!r}: with languages, a text column names each "
          f"language's captions with '{{lang}}' (e.g. 'text_{{lang}}', the default); without "
          f"languages it must not hold '{{lang}}'.")

  def __init__(self, name, ev, context):
    self.languages = tuple(ev.languages)
    if self.languages:  # text_column "...{lang}..." is per language: none for the images.
      ev = ev.copy_and_resolve_references()
      self.text_column, ev.text_column = ev.text_column or "text_{lang}", None
    super().__init__(name, ev, context)
    self.pair = tuple(ev.modalities)
    if self.pair != ("image", "text"):
      check_towers(f"evals.{name}.modalities={self.pair!r}", context.objective, self.pair)
      self.input_cfg = modality_input(name, self.input_cfg, ev, self.pair)
    if len(self.languages) > 1 and ev.cross_lingual and common.own_similarity(context):
      raise config_lib.ConfigError(
          f"evals.{name}: cross-lingual text->text retrieval ranks by the dot product of text "
          f"embeddings, which this objective's own (FILIP token-wise) similarity has no "
          f"counterpart of; set evals.{name}.cross_lingual=False.")

  def _language_input(self, language: str):
    """The eval input config reading the captions in `language`."""
    cfg = self.input_cfg.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.text_column = self.text_column.format(lang=language)
    return cfg

  def evaluate(self, params) -> dict[str, float]:
    if self.languages:
      return self._evaluate_languages(params)
    if self.pair != ("image", "text"):
      return self._evaluate_pair(params)
    ev = self.ev
    data = self.context.embedder.split(params, self.input_cfg, ev.batch_size,
                                       captions=ev.captions_per_image)
    zimg, ztxt, owner = data["zimg"], data["ztxt"], data["caption_owner"]
    check_finite(self.name, "image", zimg)
    check_finite(self.name, "text", ztxt)
    out = self._image_text(zimg, ztxt, owner, data.get("label"))
    out["num_examples"] = float(len(zimg))
    out["num_captions"] = float(len(ztxt))
    return out

  def _evaluate_languages(self, params) -> dict[str, float]:
    """Per language, their means and cross-lingual text->text recall (module docstring)."""
    ev, embedder = self.ev, self.context.embedder
    # The images (with the first language's captions as the records' text, unused).
    images = embedder.split(params, self._language_input(self.languages[0]), ev.batch_size,
                            texts=False)
    zimg = images["zimg"]
    check_finite(self.name, "image", zimg)
    out, texts = {}, {}
    for lang in self.languages:
      data = embedder.split(params, self._language_input(lang), ev.batch_size, images=False,
                            captions=ev.captions_per_image)
      texts[lang] = data["ztxt"], data["caption_owner"]
      check_finite(self.name, f"{lang} text", data["ztxt"])
      metrics = self._image_text(zimg, *texts[lang], images.get("label"))
      metrics["num_captions"] = float(len(data["ztxt"]))
      out.update({f"{lang}/{k}": v for k, v in metrics.items()})
    out.update({f"mean/{k}": float(np.mean([out[f"{lang}/{k}"] for lang in self.languages]))
                for k in metrics})
    if ev.cross_lingual and len(self.languages) > 1:
      out.update(cross_lingual_recalls(texts, ev.ks))
    out["num_examples"] = float(len(zimg))
    return out

  def _evaluate_pair(self, params) -> dict[str, float]:
    """modalities=(a, b): one item per record, records with both (module docstring)."""
    (a, b), ev = self.pair, self.ev
    data = embed_modalities(self.context, params, self.input_cfg, ev.batch_size, self.pair)
    za, zb = data[a], data[b]
    if not len(za):
      raise ValueError(f"evals.{self.name}: no record of split {ev.split!r} of "
                       f"{self.input_cfg.data!r} has both {a!r} and {b!r}; evaluate on data "
                       f"that pairs them (evals.{self.name}.data).")
    check_finite(self.name, a, za)
    check_finite(self.name, b, zb)
    rows, labels, names = np.arange(len(za)), data.get("label"), (f"{a}2{b}", f"{b}2{a}")
    out = _recall_metrics(za, zb, rows, labels, ev.ks, names=names)
    for dim in common.matryoshka_dims(self.context, za.shape[-1]):
      at_dim = _recall_metrics(common.matryoshka_prefix(za, dim),
                               common.matryoshka_prefix(zb, dim), rows, labels, ev.ks,
                               names=names)
      out.update({f"{k}@d{dim}": value for k, value in at_dim.items()})
    out["num_examples"] = float(len(za))
    out["num_skipped"] = float(data["num_skipped"])
    return out

  def _image_text(self, zimg, ztxt, owner, labels) -> dict[str, float]:
    """_recall_metrics with the objective's scores, and at each Matryoshka prefix dim."""
    ev = self.ev
    if common.own_similarity(self.context):
      logging.getLogger("big_mm").info(
          "evals.%s: ranking by the objective's own (FILIP token-wise) similarity.", self.name)
    out = _recall_metrics(zimg, ztxt, owner, labels, ev.ks,
                          functools.partial(common.scores, self.context))
    for dim in common.matryoshka_dims(self.context, zimg.shape[-1]):
      at_dim = _recall_metrics(common.matryoshka_prefix(zimg, dim),
                               common.matryoshka_prefix(ztxt, dim), owner, labels, ev.ks)
      out.update({f"{name}@d{dim}": value for name, value in at_dim.items()})
    return out


def cross_lingual_recalls(texts, ks) -> dict[str, float]:
  """{"<A>-><B>/R@k": recall of A's captions querying B's (right: a caption of the same image),
  "cross_lingual/R@k": the mean over the ordered pairs}; texts: {language: (ztxt [M, D], owner
  [M], each caption's image row)}."""
  out = {}
  pairs = [(a, b) for a in texts for b in texts if a != b]
  for a, b in pairs:
    (za, owner_a), (zb, owner_b) = texts[a], texts[b]
    has_b = np.isin(owner_a, owner_b)  # Queries whose image has a caption in b.
    za, owner_a = za[has_b], owner_a[has_b]
    recalls = _recalls(za, zb, lambda rows: owner_a[rows][:, None] == owner_b[None], ks)
    out.update({f"{a}->{b}/R@{k}": value for k, value in recalls.items()})
  out.update({f"cross_lingual/R@{k}": float(np.mean([out[f"{a}->{b}/R@{k}"] for a, b in pairs]))
              for k in ks})
  return out
