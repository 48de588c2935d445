"""N-modal binding: one embedding space for several modalities of a towers model.

Pairwise binding (ImageBind, Girdhar et al. 2023; LanguageBind, Zhu et al. 2024): the loss is
sum_k w_k * contrastive_loss(z[a_k], z[b_k]) over `pairs` ((a, b, w), ...), each the sigmoid
or softmax loss over the global batch with any cross-device strategy (losses.py). Every
pair shares the model's temperature t and bias b. LanguageBind: every pair has "text" as one
side and the text tower is frozen (optim.lr_mults 0) and initialised from a trained run
(config.init); ImageBind: every pair has "image" as one side.

Higher-order terms over M >= 2 modalities (`higher_order_modalities`, default: every modality
of the pairs), added with weight `higher_order_weight`:
  "symile"  Symile (Saporta et al. 2024): the multilinear inner product of the M embeddings as
            the score, negatives per anchor modality, O(N) ("n") or O(N^2) ("n2")
            (`symile_negatives`); objectives/higher_order.py.
  "gram"    GRAM (Cicchetti et al. 2025): minus the volume spanned by the M vectors (the
            square root of their Gram determinant) as the score, `gram_anchor` (default
            "text" when listed, else the first) against the other modalities of every
            candidate; objectives/higher_order.py.
With `pairs=()` the higher-order term is the whole loss.

Missing modalities: a batch from input.modalities in binding mode holds "{m}_present" [B];
a pair counts only rows with both present (`valid`), a higher-order term rows with all M.
Such rows are neither anchors nor negatives. Metrics: `binding/<a>_<b>/loss` and `/rows`
(rows with both present), `binding/<symile|gram>/loss` and `/rows`, `missing/<m>` (rows
without m), t, b. A batch where no row has a pair gives that pair's loss 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from big_mm import modalities as modalities_lib
from big_mm import sharding
from big_mm.models import aux_loss
from big_mm.objectives import base, contrastive, higher_order, losses

HIGHER_ORDER = (None, "symile", "gram")
SYMILE_NEGATIVES = ("n", "n2")


def _names(settings) -> tuple[list[tuple[str, str, float]], tuple[str, ...]]:
  """(pairs as (a, b, weight) with canonical names, higher-order modalities)."""
  pairs = [(modalities_lib.get(a).name, modalities_lib.get(b).name, float(w))
           for a, b, w in settings["pairs"]]
  ho = tuple(modalities_lib.get(m).name for m in settings["higher_order_modalities"])
  if settings["higher_order"] and not ho:
    ho = tuple(dict.fromkeys(m for a, b, _ in pairs for m in (a, b)))
  return pairs, ho


class Binding:
  """Pairwise and higher-order binding of the towers of `model` (see the module docstring)."""
  NAME = "binding"
  SETTINGS = dict(pairs=(("image", "text", 1.0),), loss="sigmoid", strategy="all_gather",
                  implementation="xla", higher_order=None, higher_order_modalities=(),
                  higher_order_weight=1.0, symile_negatives="n", gram_anchor=None)
  BATCH_KEYS = tuple(m.batch_key for m in modalities_lib.MODALITIES.values())

  @classmethod
  def check_settings(cls, settings) -> None:
    contrastive.check_loss_settings(settings)
    pairs = settings["pairs"]
    if isinstance(pairs, str) or not all(
        isinstance(p, (tuple, list)) and len(p) == 3 for p in pairs):
      raise base.ConfigError(f"objective.pairs must be ((modality_a, modality_b, weight), ...), "
                             f"e.g. (('image', 'text', 1.0), ('audio', 'text', 1.0)); got "
                             f"{pairs!r}.")
    for a, b, w in pairs:
      for m in (a, b):
        base.choice("pairs entry", m, tuple(modalities_lib.names()))
      if modalities_lib.get(a) is modalities_lib.get(b) or not base.number("pairs weight", w) >= 0:
        raise base.ConfigError(f"objective.pairs entry {(a, b, w)!r}: two different modalities "
                               f"and a weight >= 0.")
    base.choice("higher_order", settings["higher_order"], HIGHER_ORDER)
    base.choice("symile_negatives", settings["symile_negatives"], SYMILE_NEGATIVES)
    base.number("higher_order_weight", settings["higher_order_weight"])
    for m in settings["higher_order_modalities"]:
      base.choice("higher_order_modalities entry", m, tuple(modalities_lib.names()))
    pairs, ho = _names(settings)
    if not pairs and not settings["higher_order"]:
      raise base.ConfigError("objective.pairs is empty and objective.higher_order is None: "
                             "there is nothing to train; give pairs or a higher-order loss.")
    if settings["higher_order"]:
      if len(set(ho)) != len(ho) or len(ho) < 2:
        raise base.ConfigError(f"objective.higher_order_modalities={ho!r}: name at least two "
                               f"different modalities (by default those of objective.pairs), "
                               f"e.g. ('image', 'audio', 'text').")
      if settings["strategy"] == "ring":
        raise base.ConfigError("objective.strategy='ring' runs the pairwise losses only; the "
                               "higher-order losses gather every modality ('all_gather' or "
                               "'local').")
      anchor = settings["gram_anchor"]
      if settings["higher_order"] == "gram" and anchor is not None and (
          anchor not in modalities_lib.names() or modalities_lib.get(anchor).name not in ho):
        raise base.ConfigError(f"objective.gram_anchor={settings['gram_anchor']!r} must be one "
                               f"of objective.higher_order_modalities {ho}.")

  def __init__(self, model, ctx: base.Context, **settings):
    settings = base.fill(type(self), settings)
    self.model, self.ctx, self.mesh = model, ctx, ctx.mesh
    self.loss_name, self.strategy = settings["loss"], settings["strategy"]
    self.implementation = settings["implementation"]
    self.pairs, self.ho_modalities = _names(settings)
    self.higher_order = settings["higher_order"]
    self.ho_weight = float(settings["higher_order_weight"])
    self.symile_negatives = settings["symile_negatives"]
    anchor = settings["gram_anchor"] or ("text" if "text" in self.ho_modalities else None)
    self.gram_anchor = (modalities_lib.get(anchor).name if anchor else
                        (self.ho_modalities or (None,))[0])
    used = tuple(dict.fromkeys([m for a, b, _ in self.pairs for m in (a, b)]
                               + list(self.ho_modalities if self.higher_order else ())))
    self.modalities = used
    towers = dict(getattr(model, "towers", None) or {})
    missing = [m for m in used if m not in towers]
    if missing:
      raise base.ConfigError(f"objective.pairs / higher_order_modalities use {missing}, which "
                             f"the model has no tower for (model.towers: {sorted(towers)}); "
                             "use model_name='towers' with a tower per modality.")
    listed = ctx.modalities
    if listed is not None:
      absent = [m for m in used if m not in {modalities_lib.get(x).name for x in listed}]
      if absent:
        raise base.ConfigError(f"objective.binding uses {absent}, which input.modalities="
                               f"{tuple(listed)} does not list; add them there.")
    if "text" in towers:
      base.check_vocab(ctx, dict(towers["text"] or {}).get("vocab_size"),
                       "model.towers.text.vocab_size")

  def example_batch(self):
    return base.modality_example(self.ctx, self.model.towers)

  def init_params(self, rng):
    example = base.zeros(self.example_batch())
    inputs = {m: modalities_lib.model_input(example, m) for m in self.model.towers}
    return self.model.init({"params": rng}, inputs, train=False)["params"]

  def loss_fn(self, params, batch, rng):
    params = base.stop_frozen(self.ctx, params)
    rng_dropout, rng_negatives = jax.random.split(rng)
    inputs = {m: modalities_lib.model_input(batch, m) for m in self.modalities}
    (z, out), aux = aux_loss.apply(self.model, params, inputs, train=True,
                                   rngs={"dropout": rng_dropout})
    rows = next(iter(z.values())).shape[0]
    present = {m: jnp.asarray(batch.get(modalities_lib.present_key(m), jnp.ones((rows,))),
                              jnp.float32) for m in self.modalities}
    batch_axes = sharding.batch_axes(self.mesh)
    metrics = {"t": out["t"], "t/parameterized": out["t/parameterized"], "b": out["b"]}
    metrics.update({f"missing/{m}": rows - jnp.sum(p) for m, p in present.items()})
    loss = jnp.zeros((), jnp.float32)
    for a, b, w in self.pairs:
      valid = present[a] * present[b]
      pair_loss = losses.contrastive_loss(
          z[a], z[b], out["t"], out["b"], loss=self.loss_name, strategy=self.strategy,
          implementation=self.implementation, mesh=self.mesh, batch_axes=batch_axes,
          valid=valid)
      loss = loss + w * pair_loss
      metrics[f"binding/{a}_{b}/loss"] = pair_loss
      metrics[f"binding/{a}_{b}/rows"] = jnp.sum(valid)
    if self.higher_order:
      zs = [z[m] for m in self.ho_modalities]
      valid = jnp.prod(jnp.stack([present[m] for m in self.ho_modalities]), axis=0)
      kw = dict(valid=valid, strategy=self.strategy, mesh=self.mesh, batch_axes=batch_axes)
      if self.higher_order == "symile":
        ho_loss = higher_order.symile_loss(zs, out["t"], negatives=self.symile_negatives,
                                           rng=rng_negatives, **kw)
      else:
        ho_loss = higher_order.gram_loss(
            zs, out["t"], anchor=self.ho_modalities.index(self.gram_anchor), **kw)
      loss = loss + self.ho_weight * ho_loss
      metrics[f"binding/{self.higher_order}/loss"] = ho_loss
      metrics[f"binding/{self.higher_order}/rows"] = jnp.sum(valid)
    return aux_loss.add(loss, metrics, aux)

  # ----------------------------------------------------------------------- predict fns

  def embed(self, params, modality: str, x):
    """The normalised embedding of `x` by `modality`'s tower."""
    name = modalities_lib.get(modality).name
    z, _ = self.model.apply({"params": params}, {name: x}, train=False)
    return z[name]

  def embed_images(self, params, images):
    return self.embed(params, "image", images)

  def embed_texts(self, params, texts):
    return self.embed(params, "text", texts)

  def higher_order_scores(self, query, target: str, candidates):
    """[Q, K] scores of Q query tuples ({modality: z [Q, D]}) against K candidates [K, D] of
    `target`: the trained higher-order score (Symile's multilinear product, GRAM's minus
    volume), or for a pairwise objective the sum of the query modalities' cosines."""
    zs = [query[m] for m in query]
    if self.higher_order == "symile":
      return higher_order.symile_scores(zs, candidates)
    if self.higher_order == "gram":
      return higher_order.gram_scores(zs, candidates)
    return sum(q @ candidates.T for q in zs)
