"""Contrastive objective (SigLIP sigmoid, CLIP softmax; LiT = frozen image tower) between two
modalities of a towers model (`objective.modalities`, by default ("image", "text")).

The loss is computed over the global batch with an explicit cross-device strategy
(`objective.strategy`: all_gather | ring | local), see `losses.contrastive_loss`.

`objective.micro_batches = m > 1` trains with gradient caching (GradCache, Gao et al. 2021;
open_clip's --accum-freq): the loss and its negatives are always the FULL global batch, only
the towers run m micro-batches at a time, so tower activation memory is one micro-batch's.
`value_and_grad` then
  (a) runs both towers over the m micro-batches without building gradients, giving the
      full-batch embeddings;
  (b) computes the full-batch loss and its gradient w.r.t. the embeddings and the head
      params (t, b);
  (c) re-runs each micro-batch's towers under `jax.vjp` and back-propagates its slice of the
      cached embedding gradients, accumulating the param gradients.
Micro-batch i reuses the same dropout rng in (a) and (c), so the result is exactly the
gradient of `loss_fn` (which computes its embeddings micro-batch by micro-batch too).
This is NOT plain gradient accumulation, which would shrink the negatives to a micro-batch.
Micro-batch i is rows i, i+m, i+2m, ... of the batch: with the batch sharded contiguously over
the batch axes, every device holds B/(m*n_dev) rows of every micro-batch (no data moves).

`objective.matryoshka_dims = (d1, ..., D)` trains Matryoshka embeddings (Kusupati et al. 2022,
MRL): the loss is sum_k w_k * loss(prefix_k(za), prefix_k(zb)), prefix_k(z) = z[:, :d_k]
re-normalised (the full dim as it is), with `matryoshka_weights` w_k (default all 1) and the
temperature and bias shared by every prefix. Every prefix loss reads the same embeddings, so
the towers run once (GradCache too: it only needs the embeddings' gradients). Metrics
`loss@d<k>` give each prefix's unweighted loss; the evaluators report their metrics at each
prefix dim too (`accuracy@d<k>`). Empty (the default): the plain loss.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from big_mm import modalities as modalities_lib
from big_mm import sharding
from big_mm.models import aux_loss
from big_mm.models.towers import l2_normalize
from big_mm.objectives import base, losses

LOSSES = ("sigmoid", "softmax")
STRATEGIES = ("local", "all_gather", "ring")
# "pallas": fused kernels, never build the B x B logits; "chunked": XLA over chunks of rows.
IMPLEMENTATIONS = ("xla", "pallas", "chunked")


def check_loss_settings(settings) -> None:
  """loss / strategy / implementation of `losses.contrastive_loss` (also CoCa's)."""
  base.choice("loss", settings["loss"], LOSSES)
  base.choice("strategy", settings["strategy"], STRATEGIES)
  base.choice("implementation", settings["implementation"], IMPLEMENTATIONS)


# ----------------------------------------------------------------------- Matryoshka (MRL)

def check_matryoshka_settings(settings) -> None:
  """matryoshka_dims: () or increasing positive ints; matryoshka_weights: () or one positive
  number per dim. (That the dims fit the embedding is checked against the model.)"""
  dims, weights = settings["matryoshka_dims"], settings["matryoshka_weights"]
  example = "e.g. (32, 64, 128, 256) for a 256-d embedding; () for the plain loss"
  if isinstance(dims, str) or not isinstance(dims, (tuple, list)) or any(
      isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
    raise base.ConfigError(f"objective.matryoshka_dims must be a tuple of positive embedding "
                           f"dims ({example}); got {dims!r}.")
  if any(a >= b for a, b in zip(dims, dims[1:])):
    raise base.ConfigError(f"objective.matryoshka_dims must be strictly increasing (nested "
                           f"prefixes, {example}); got {tuple(dims)!r}.")
  if isinstance(weights, str) or not isinstance(weights, (tuple, list)):
    raise base.ConfigError(f"objective.matryoshka_weights must be a tuple of loss weights, one "
                           f"per matryoshka_dims entry (() = all 1); got {weights!r}.")
  if weights and (not dims or len(weights) != len(dims)):
    raise base.ConfigError(f"objective.matryoshka_weights has {len(weights)} entries but "
                           f"matryoshka_dims={tuple(dims)!r} has {len(dims)}; give one weight "
                           "per dim, or () for all 1.")
  for w in weights:
    if not base.number("matryoshka_weights entry", w) > 0:
      raise base.ConfigError(f"objective.matryoshka_weights entries must be > 0; got "
                             f"{tuple(weights)!r}.")


def matryoshka_prefix(z, dim: int):
  """The first `dim` features of the embeddings z [B, D], re-normalised; z itself when dim
  is D (the model's embeddings are normalised already, so the full-dim loss is unchanged)."""
  return z if dim == z.shape[-1] else l2_normalize(z[..., :dim])


def matryoshka_loss(loss_fn, za, zb, dims, weights):
  """(sum_k weights[k] * loss_fn(prefix_k(za), prefix_k(zb)), {"loss@d<k>": that prefix's
  loss}); loss_fn(za, zb) -> scalar is the contrastive loss of one pair of embeddings."""
  total, metrics = None, {}
  for dim, weight in zip(dims, weights):
    loss = loss_fn(matryoshka_prefix(za, dim), matryoshka_prefix(zb, dim))
    metrics[f"loss@d{dim}"] = loss
    total = weight * loss if total is None else total + weight * loss
  return total, metrics


# ----------------------------------------------------------------------- several positives
# input.captions_per_example = k > 1 gives the text side k captions per image, [B, k, L]: the
# tower embeds the B*k captions and the loss gets zb [B, k, D], every caption a positive of its
# image (losses.multi_positive_loss).

def _has_positives_axis(x, modality: str) -> bool:
  """x holds k inputs per example: one axis more than [B] + the modality's example shape (a
  padded input, {"x", "mask", "shape"}, has one per example; a pp-shaped kind's rank is its
  pp's, e.g. a video's test views [B, V, T, H, W, 3], which its tower averages)."""
  mod = modalities_lib.get(modality)
  if x is None or isinstance(x, dict) or mod.kind in modalities_lib.PP_SHAPED:
    return False
  return x.ndim == len(mod.example_shape((1, 1), 1)) + 2


def flatten_positives(xa, xb, modalities):
  """(xb as [B*k, ...], k) where xb is [B, k, ...] (k positives per example); else (xb,
  None). Only the second contrasted modality may have several: the loss takes one za row per
  example."""
  if _has_positives_axis(xa, modalities[0]):
    raise ValueError(f"objective.modalities={tuple(modalities)}: {modalities[0]!r} has several "
                     f"inputs per example ({xa.shape}), but only the second contrasted "
                     f"modality may (input.captions_per_example); put the modality with "
                     f"several inputs second.")
  if not _has_positives_axis(xb, modalities[1]):
    return xb, None
  return xb.reshape((-1,) + xb.shape[2:]), xb.shape[1]


def unflatten_positives(zb, k):
  """[B*k, D] embeddings -> [B, k, D] (k None: zb as it is)."""
  return zb if k is None or zb is None else zb.reshape((-1, k) + zb.shape[1:])


def positive_cosine(za, zb):
  """The positive pairs' mean cosine similarity; zb [B, D], or [B, k, D] (k positives each)."""
  return jnp.mean(jnp.sum((za if zb.ndim == za.ndim else za[:, None]) * zb, axis=-1))


class Contrastive:
  """`loss_fn(params, batch, rng) -> (loss, metrics)`,
  `value_and_grad(params, batch, rng) -> ((loss, metrics), grads)` (GradCache when
  `micro_batches > 1`) and embedding predict fns. Reads the context's mesh, batch_size,
  frozen mask and tokenizer (its vocabulary must be the text tower's)."""
  NAME = "contrastive"
  # modalities: the two towers' modalities whose embeddings are contrasted (a, b): the loss
  # treats a as the "image" side and b as the "text" side. micro_batches: GradCache (see the
  # module docstring); 1: the whole batch at once.
  # matryoshka_dims / matryoshka_weights: Matryoshka embeddings (see the module docstring).
  SETTINGS = dict(loss="sigmoid", strategy="all_gather", implementation="xla", micro_batches=1,
                  modalities=("image", "text"), matryoshka_dims=(), matryoshka_weights=())
  HINTS = {"micro_batches": "GradCache is implemented for the contrastive objective only",
           "matryoshka_dims": "Matryoshka embeddings are implemented for the contrastive "
                              "objective only",
           "matryoshka_weights": "Matryoshka embeddings are implemented for the contrastive "
                                 "objective only"}
  BATCH_KEYS = tuple(m.batch_key for m in modalities_lib.MODALITIES.values())

  @classmethod
  def check_settings(cls, settings) -> None:
    check_loss_settings(settings)
    base.positive_int("micro_batches", settings["micro_batches"],
                      " (1: the whole batch at once; m > 1: GradCache over m micro-batches)")
    pair = settings["modalities"]
    if isinstance(pair, str) or len(tuple(pair)) != 2 or len(set(pair)) != 2:
      raise base.ConfigError(f"objective.modalities must be two different modalities, e.g. "
                             f"('image', 'text'); got {pair!r}.")
    for m in pair:
      base.choice("modalities entry", m, tuple(modalities_lib.MODALITIES))
    check_matryoshka_settings(settings)

  def __init__(self, model, ctx: base.Context, **settings):
    settings = base.fill(type(self), settings)
    self.model = model
    self.ctx = ctx
    self.mesh = ctx.mesh
    self.loss_name = settings["loss"]
    self.strategy = settings["strategy"]
    self.implementation = settings["implementation"]
    self.micro_batches = settings["micro_batches"]
    self.modalities = tuple(settings["modalities"])
    towers = dict(getattr(model, "towers", None) or {})
    missing = [m for m in self.modalities if m not in towers]
    if missing:
      raise base.ConfigError(
          f"objective.modalities={self.modalities} but the model has no tower for {missing} "
          f"(model.towers: {sorted(towers)}); use model_name='towers' with a tower per "
          "contrasted modality.")
    self.scopes = tuple(modalities_lib.get(m).scope for m in self.modalities)
    if "text" in towers:
      base.check_vocab(ctx, dict(towers["text"] or {}).get("vocab_size"),
                       "model.towers.text.vocab_size")
    if ctx.batch_size is not None:
      self._check_batch_size(ctx.batch_size)
    self.matryoshka_dims = tuple(settings["matryoshka_dims"])
    self.matryoshka_weights = tuple(float(w) for w in settings["matryoshka_weights"]) or (
        1.0,) * len(self.matryoshka_dims)
    if self.matryoshka_dims:
      self._check_matryoshka_dims()

  def embedding_dims(self) -> dict[str, int]:
    """{modality: D}: the contrasted towers' embedding dims (shapes only, nothing computed)."""
    example = base.zeros(base.modality_example(self.ctx, self.modalities))
    inputs = {m: modalities_lib.model_input(example, m) for m in self.modalities}
    (z, _), _ = jax.eval_shape(lambda: self.model.init_with_output(
        jax.random.key(0), inputs, train=False))
    return {m: z[m].shape[-1] for m in self.modalities}

  def _check_matryoshka_dims(self):
    dims = self.embedding_dims()
    largest = min(dims.values())
    if self.matryoshka_dims[-1] > largest:
      raise base.ConfigError(
          f"objective.matryoshka_dims={self.matryoshka_dims} goes beyond the embedding: the "
          f"contrasted towers embed in {dims} dims (model.out_dim, or the tower width where a "
          f"tower has no head); use prefixes of at most {largest}, e.g. "
          f"{tuple(largest // 2 ** i for i in (3, 2, 1, 0) if largest // 2 ** i)}.")

  def example_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    return base.modality_example(self.ctx, self.model.towers)

  def init_params(self, rng):
    """Initial (boxed) params, from zeros shaped like `example_batch()` (every tower)."""
    example = base.zeros(self.example_batch())
    inputs = {m: modalities_lib.model_input(example, m) for m in self.model.towers}
    return self.model.init({"params": rng}, inputs, train=False)["params"]

  def _batch_devices(self):
    if self.mesh is None:
      return {}
    return {a: self.mesh.shape[a] for a in sharding.batch_axes(self.mesh)}

  def _check_batch_size(self, batch_size):
    m = self.micro_batches
    devices = self._batch_devices()
    n_dev = math.prod(devices.values())
    if batch_size % (m * n_dev):
      raise base.ConfigError(
          f"objective.micro_batches={m} (GradCache) needs batch_size divisible by "
          f"micro_batches x batch devices = {m} x {n_dev} (mesh {devices}) = {m * n_dev}, so "
          f"that every micro-batch is spread evenly over the devices; got batch_size="
          f"{batch_size}. Use a batch_size that is a multiple of {m * n_dev} or change "
          "objective.micro_batches.")

  def _frozen(self, params):
    if self.ctx.frozen is None:
      return jax.tree.map(lambda _: False, params)
    return self.ctx.frozen(params)

  def _frozen_towers(self, params):
    """(a, b): True where every param of that contrasted tower is frozen."""
    frozen = self._frozen(params)
    return tuple(bool(jax.tree.leaves(frozen.get(k, {}))) and all(jax.tree.leaves(frozen[k]))
                 for k in self.scopes)

  # ----------------------------------------------------------------------- micro-batches

  def _constrain(self, x, *, split):
    """Rows over the batch axes: dim 1 of a split [m, B/m, ...] array, else dim 0."""
    if self.mesh is None:
      return x
    axes = sharding.batch_axes(self.mesh)
    spec = P(None, axes) if split else P(axes)
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

  def _split(self, x):
    """[B, ...] -> [m, B/m, ...] (each array of a pytree); micro-batch i is rows i, i+m, ...
    (a local reshape per device)."""
    if x is None:
      return None
    m = self.micro_batches
    return jax.tree.map(lambda a: self._constrain(
        jnp.swapaxes(a.reshape((a.shape[0] // m, m) + a.shape[1:]), 0, 1), split=True), x)

  def _merge(self, y):
    """Inverse of `_split`: [m, B/m, ...] -> [B, ...] in the original row order."""
    y = jnp.swapaxes(y, 0, 1)
    y = y.reshape((y.shape[0] * y.shape[1],) + y.shape[2:])
    return self._constrain(y, split=False)

  def _towers(self, params, xa, xb, rng):
    """-> (za, zb, the towers' aux loss terms); a tower whose input is None does not run."""
    xb, k = flatten_positives(xa, xb, self.modalities)
    (z, _), aux = aux_loss.apply(self.model, params, dict(zip(self.modalities, (xa, xb))),
                                 train=True, rngs={"dropout": rng})
    return z.get(self.modalities[0]), unflatten_positives(z.get(self.modalities[1]), k), aux

  def _embed(self, params, batch, rng):
    """Full-batch (za, zb) and aux loss terms (the mean over micro-batches), the towers
    run one micro-batch at a time (a scan)."""
    m = self.micro_batches
    xa, xb = (modalities_lib.model_input(batch, m) for m in self.modalities)
    if m == 1:
      return self._towers(params, xa, xb, rng)
    self._check_batch_size(jax.tree.leaves(xa)[0].shape[0])

    def body(_, xs):
      i, xa, xb = xs
      return None, self._towers(params, xa, xb, jax.random.fold_in(rng, i))

    xs = (jnp.arange(m), self._split(xa), self._split(xb))
    _, (za, zb, aux) = jax.lax.scan(body, None, xs)
    return self._merge(za), self._merge(zb), jax.tree.map(lambda a: jnp.mean(a, 0), aux)

  # ----------------------------------------------------------------------- loss

  def _loss_from_embeddings(self, za, zb, params):
    # Only the head params (t, b) are read here; the towers do not run.
    _, out = self.model.apply({"params": params}, {}, train=True)

    def contrastive(za, zb):
      return losses.contrastive_loss(
          za, zb, out["t"], out["b"], loss=self.loss_name, strategy=self.strategy,
          implementation=self.implementation,
          mesh=self.mesh, batch_axes=sharding.batch_axes(self.mesh))

    metrics = {"t": out["t"], "t/parameterized": out["t/parameterized"], "b": out["b"]}
    if self.matryoshka_dims:
      loss, prefix_losses = matryoshka_loss(contrastive, za, zb, self.matryoshka_dims,
                                            self.matryoshka_weights)
      metrics.update(prefix_losses)
    else:
      loss = contrastive(za, zb)
    # The positive pairs' mean cosine similarity, e.g. "img_txt_cos/pos".
    metrics["{}_{}_cos/pos".format(*self.scopes)] = positive_cosine(za, zb)
    return loss, metrics

  def loss_fn(self, params, batch, rng):
    """The full-batch loss. With micro_batches > 1 the embeddings are computed micro-batch
    by micro-batch (micro-batch i with dropout rng fold_in(rng, i)), exactly as in
    `value_and_grad`; differentiating this directly keeps every micro-batch's activations."""
    params = base.stop_frozen(self.ctx, params)
    za, zb, aux = self._embed(params, batch, rng)
    return aux_loss.add(*self._loss_from_embeddings(za, zb, params), aux)

  def value_and_grad(self, params, batch, rng):
    """((loss, metrics), grads) of `loss_fn`; GradCache when micro_batches > 1 (see the module
    docstring): full-batch negatives, one micro-batch's tower activations at a time."""
    if self.micro_batches == 1:
      return jax.value_and_grad(self.loss_fn, has_aux=True)(params, batch, rng)
    params = base.stop_frozen(self.ctx, params)
    # (a) Full-batch embeddings, no gradients built.
    za, zb, aux = self._embed(params, batch, rng)
    # (b) Full-batch loss; gradients w.r.t. the embeddings and the params (only t, b non-zero).
    (loss, metrics), (g_za, g_zb, grads) = jax.value_and_grad(
        self._loss_from_embeddings, argnums=(0, 1, 2), has_aux=True)(za, zb, params)
    loss, metrics = aux_loss.add(loss, metrics, aux)
    # (c) Back-propagate each micro-batch's embedding gradients through its towers. A fully
    # frozen tower (LiT) is not re-run: it has no gradient to give.
    frozen_a, frozen_b = self._frozen_towers(params)
    xa, xb = (modalities_lib.model_input(batch, m) for m in self.modalities)
    xa = None if frozen_a else self._split(xa)
    xb = None if frozen_b else self._split(xb)
    g_za = None if frozen_a else self._split(g_za)
    g_zb = None if frozen_b else self._split(g_zb)

    def body(acc, xs):
      i, xa, xb, g_za, g_zb = xs
      rng_i = jax.random.fold_in(rng, i)  # micro-batch i's dropout rng, as in (a)
      (_, _, aux_i), vjp = jax.vjp(lambda p: self._towers(p, xa, xb, rng_i), params)
      # The loss holds the mean of the micro-batches' aux terms.
      g_aux = jax.tree.map(lambda a: jnp.full_like(a, 1.0 / self.micro_batches), aux_i)
      (g,) = vjp((g_za, g_zb, g_aux))
      return jax.tree.map(jnp.add, acc, g), None

    # The accumulator is laid out like the params, so with replicated params each micro-batch's
    # gradient is all-reduced inside the loop (as open_clip's accum-freq under DDP).
    xs = (jnp.arange(self.micro_batches), xa, xb, g_za, g_zb)
    grads, _ = jax.lax.scan(body, grads, xs)
    return (loss, metrics), grads

  # ----------------------------------------------------------------------- predict fns

  def embed(self, params, modality: str, x):
    """The normalised embedding of `x` by `modality`'s tower."""
    z, _ = self.model.apply({"params": params}, {modality: x}, train=False)
    return z[modality]

  def embed_images(self, params, images):
    return self.embed(params, "image", images)

  def patch_features(self, params, images):
    """The image tower's un-pooled output tokens ("encoded", without a class token) as a
    [B, h, w, D] patch grid, for frozen-feature dense probes (evaluators/dense_probe.py)."""
    _, out = self.model.apply({"params": params}, {"image": images}, train=False)
    scope = modalities_lib.get("image").scope
    encoded, (b, h, w, _) = out[f"{scope}/encoded"], out[f"{scope}/stem"].shape
    return encoded[:, encoded.shape[1] - h * w:].reshape(b, h, w, -1)

  def embed_texts(self, params, texts):
    return self.embed(params, "text", texts)
