"""Higher-order contrastive losses over M >= 2 modalities: Symile and GRAM.

Public API (`zs`: a list of M L2-normalised [B, D] embeddings, row i of each one example;
`t`: the already exponentiated logit scale, a scalar):
  mip(zs) -> [B]                       multilinear inner product sum_d prod_m zs[m][:, d]
  symile_permutations(rng, M, B)       the O(N) negatives' permutations, int32 [M, M - 1, B]
  symile_loss(zs, t, *, negatives, rng, valid, strategy, mesh, batch_axes) -> scalar
  gram_volume(zs) -> [B]               volume of the parallelotope spanned by the M vectors
  gram_loss(zs, t, *, anchor, valid, strategy, mesh, batch_axes) -> scalar
  symile_scores(query_zs, candidates) -> [Q, K]   MIP of the M - 1 query vectors with each
  gram_scores(query_zs, candidates) -> [Q, K]       candidate / minus their joint volume

Symile (Saporta et al., NeurIPS 2024; rajesh-lab/symile@d12e2c8 symile/loss.py `Symile`,
experiments/losses.py `symile`): each modality m in turn is the anchor; row i's logits are
t * MIP(z_m[i], candidate) for B (or B^(M-1)) candidates, the positive is the aligned tuple
(i, ..., i), the anchor's loss is the mean cross-entropy over rows, and the loss is the mean
over the M anchors.
  negatives="n"  (`compute_logits_n`): each non-anchor modality's rows are shuffled by its own
                 random permutation (fresh ones for every anchor: M * (M - 1) in all), their
                 elementwise product is candidate j, and the diagonal (i, i) is replaced by the
                 positive MIP. Shuffled candidates may coincide with the positive (false
                 negatives), as in the paper's code.
  negatives="n2" (`compute_logits_n_squared` / `compute_non_anchor_products`): every
                 combination of the non-anchor modalities' rows, B^(M-1) candidates per row
                 (B^2 for M = 3; for M > 3 the library's recursive version, memory
                 B^(M-1) * D per anchor). For M = 2 it is CLIP's softmax loss exactly.
Here the permutations come from `rng` (symile_permutations) on the global batch size, so they
are the same whatever the number of devices.

GRAM (Cicchetti et al., ICLR 2025; ispamm/GRAM@b70c5c2 utils/volume.py `volume_computation`,
model/gram.py `GRAM.forward_ret`): volume(v_1..v_M) = sqrt(|det G|), G the Gram matrix of the
vectors. The anchor (text in the paper) of row i against the volume spanned by it and the other
modalities of every candidate j, logits -volume / contra_temp (contra_temp a learned
nn.Parameter, 0.07 at init: here t = 1 / contra_temp), cross-entropies in both directions
(anchor -> tuples and tuple -> anchors), averaged, with label_smoothing=0.1. Here the volume
is sqrt(max(det G, 0) + eps), finite with finite gradients when the vectors are collinear.
Left out: GRAM's ITM loss (a fusion encoder's match head on negatives sampled by volume). The
repo gathers the other devices' embeddings without gradient (`concat_all_gather`); here the
gradients are those of the global loss, equal for every strategy.

valid (bool/float [B], global, sharded like the embeddings): rows with valid 0 are neither
anchors nor candidates (an "n" candidate is dropped if any of its shuffled rows is invalid);
losses are means over valid anchor rows; no valid row gives 0 with finite gradients.

Strategies: "local" computes on the global arrays (GSPMD inserts the collectives);
"all_gather" runs under `jax.shard_map` over `mesh`'s batch axes: every device gathers all
embeddings and computes the logits of its own anchor rows against all candidates, the row
losses are psum'd. Both equal the same full-batch loss (values and gradients).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from big_mm.objectives.losses import batch_axes_of

NEGATIVES = ("n", "n2")
STRATEGIES = ("local", "all_gather")
VOLUME_EPS = 1e-8
_MASKED = -1e30  # logit of an excluded candidate (finite: an all-invalid row stays finite)


# ----------------------------------------------------------------------------- helpers


def _check_zs(zs, what="zs"):
  zs = [jnp.asarray(z, jnp.float32) for z in zs]
  if len(zs) < 2:
    raise ValueError(f"{what} needs at least 2 modalities' embeddings, got {len(zs)}")
  shape = zs[0].shape
  if len(shape) != 2 or any(z.shape != shape for z in zs):
    raise ValueError(f"{what} must be [B, D] embeddings of one shape, got "
                     f"{[tuple(z.shape) for z in zs]}")
  return zs


def _check_strategy(strategy):
  if strategy not in STRATEGIES:
    raise ValueError(f"Unknown higher-order loss strategy {strategy!r}; valid: "
                     f"{', '.join(STRATEGIES)}")


def _scalar(t):
  t = jnp.asarray(t, jnp.float32)
  if t.size != 1:
    raise ValueError(f"t must be a scalar, got shape {t.shape}")
  return t.reshape(())


def _valid(valid, n):
  if valid is None:
    return jnp.ones((n,), jnp.float32)
  valid = jnp.asarray(valid)
  if valid.shape != (n,):
    raise ValueError(f"valid must have shape ({n},) like the batch, got {valid.shape}")
  return (valid != 0).astype(jnp.float32)


def _product(zs):
  p = zs[0]
  for z in zs[1:]:
    p = p * z
  return p


def mip(zs):
  """Multilinear inner product of aligned rows: sum_d prod_m zs[m][:, d] -> [B]."""
  return jnp.sum(_product(_check_zs(zs)), axis=-1)


def _row_ce(logits, pos, col_valid, label_smoothing=0.0):
  """Cross-entropy per row over the valid columns, positive logit `pos` (a valid column);
  with label smoothing eps as torch's F.cross_entropy: (1 - eps) CE + eps mean_k(-log p_k)."""
  lse = jax.nn.logsumexp(jnp.where(col_valid, logits, _MASKED), axis=1)
  ce = lse - pos
  if label_smoothing:
    n_cols = jnp.maximum(jnp.sum(col_valid.astype(jnp.float32), axis=-1), 1.0)
    mean_logit = jnp.sum(jnp.where(col_valid, logits, 0.0), axis=1) / n_cols
    ce = (1.0 - label_smoothing) * ce + label_smoothing * (lse - mean_logit)
  return ce


def _run(core, zs, valid, t, extra, *, strategy, mesh, batch_axes):
  """core(local_zs, all_zs, local_valid, all_valid, t, extra, row_offset) -> summed row losses
  of the local anchor rows (extra: replicated arrays, Symile's permutations); returns that sum
  over the global batch / max(n_valid, 1)."""
  axes = batch_axes_of(mesh, batch_axes)
  if strategy == "local" or mesh is None or not axes:
    return core(zs, zs, valid, valid, t, extra, 0) / jnp.maximum(jnp.sum(valid), 1.0)
  n_dev = 1
  for a in axes:
    n_dev *= mesh.shape[a]
  n = zs[0].shape[0]
  if n % n_dev:
    raise ValueError(f"global batch {n} not divisible by {n_dev} devices on {axes}")

  def inner(zs, valid, t, extra):
    gather = functools.partial(jax.lax.all_gather, axis_name=axes, axis=0, tiled=True)
    offset = jax.lax.axis_index(axes) * valid.shape[0]
    total = core(zs, [gather(z) for z in zs], valid, gather(valid), t, extra, offset)
    return jax.lax.psum(total, axes) / jnp.maximum(jax.lax.psum(jnp.sum(valid), axes), 1.0)

  spec = P(axes)
  return jax.shard_map(inner, mesh=mesh, in_specs=([spec] * len(zs), spec, P(), P()),
                       out_specs=P())(zs, valid, t, extra)


# ----------------------------------------------------------------------------- Symile


def symile_permutations(rng, n_modalities: int, n: int):
  """The "n" negatives' row permutations, int32 [M, M - 1, n]: [m, k] shuffles the k-th
  non-anchor modality when modality m is the anchor (symile/loss.py draws one `randperm` per
  non-anchor modality per anchor). Drawn on the global batch size: device-count independent."""
  u = jax.random.uniform(rng, (n_modalities, n_modalities - 1, n))
  return jnp.argsort(u, axis=-1).astype(jnp.int32)


def _symile_core(local_zs, all_zs, local_valid, all_valid, t, perms, row_offset, *, negatives):
  n_mod, (b, d), n = len(all_zs), local_zs[0].shape, all_zs[0].shape[0]
  pos = t * jnp.sum(_product(local_zs), axis=-1)  # [b], the positive of every anchor
  all_ok = all_valid > 0
  total = 0.0
  for m in range(n_mod):
    others = [all_zs[r] for r in range(n_mod) if r != m]
    if negatives == "n":
      cand, col_ok = jnp.ones((n, d), jnp.float32), jnp.ones((n,), bool)
      for k, z in enumerate(others):
        cand, col_ok = cand * z[perms[m, k]], col_ok & all_ok[perms[m, k]]
      logits = t * local_zs[m] @ cand.T  # [b, n]
      diag = (row_offset + jnp.arange(b))[:, None] == jnp.arange(n)[None, :]
      logits = jnp.where(diag, pos[:, None], logits)
      col_ok = diag | col_ok[None, :]
    else:
      cand, col_ok = others[0], all_ok
      for z in others[1:]:  # every combination of rows: [n^(M-1), d]
        cand = (cand[:, None, :] * z[None, :, :]).reshape(-1, d)
        col_ok = (col_ok[:, None] & all_ok[None, :]).reshape(-1)
      logits = t * local_zs[m] @ cand.T  # [b, n^(M-1)]
      col_ok = col_ok[None, :]
    ce = _row_ce(logits, pos, col_ok)
    total = total + jnp.sum(jnp.where(local_valid > 0, ce, 0.0))
  return total / n_mod


def symile_loss(zs: Sequence, t, *, negatives: str = "n", rng=None, valid=None,
                strategy: str = "local", mesh=None,
                batch_axes: Sequence[str] | str = ("data", "fsdp")):
  """Symile loss (module docstring): mean over anchor modalities of the mean cross-entropy of
  the valid anchor rows against their MIP candidates.

  Args:
    zs: M >= 2 global [B, D] embeddings, batch sharded over `batch_axes` of `mesh`.
    t: exp'd logit scale (scalar). negatives: "n" (B candidates: needs `rng`, a PRNG key,
      replicated) or "n2" (B^(M-1) candidates). valid: optional [B] mask.
    strategy: "local" | "all_gather"; mesh None means "local".
  """
  _check_strategy(strategy)
  if negatives not in NEGATIVES:
    raise ValueError(f"Unknown Symile negatives {negatives!r}; valid: {', '.join(NEGATIVES)} "
                     f"(O(N) shuffled / O(N^2) all combinations)")
  zs = _check_zs(zs)
  n = zs[0].shape[0]
  if negatives == "n":
    if rng is None:
      raise ValueError("Symile negatives='n' shuffles rows: pass rng= (a PRNG key, the same "
                       "on every device)")
    perms = symile_permutations(rng, len(zs), n)
  else:
    perms = jnp.zeros((), jnp.int32)
  core = functools.partial(_symile_core, negatives=negatives)
  return _run(core, zs, _valid(valid, n), _scalar(t), perms, strategy=strategy, mesh=mesh,
              batch_axes=batch_axes)


def symile_scores(query_zs: Sequence, candidates):
  """[Q, K] MIP of each query's M - 1 vectors (query_zs: list of [Q, D]) with each candidate
  [K, D] of the missing modality (symile/similarity.py `MIPSimilarity`)."""
  return _product(_query(query_zs)) @ jnp.asarray(candidates, jnp.float32).T


def _query(query_zs):
  query = [jnp.asarray(z, jnp.float32) for z in query_zs]
  if not query or any(z.ndim != 2 or z.shape != query[0].shape for z in query):
    raise ValueError(f"query_zs must be a non-empty list of [Q, D] embeddings of one shape, got "
                     f"{[tuple(z.shape) for z in query]}")
  return query


# ----------------------------------------------------------------------------- GRAM


def _det(g):
  """det of [..., M, M]: the cofactor formulas for M <= 3 (cheaper than jnp.linalg.det's
  batched LU over the B^2 small matrices of a GRAM loss: loss and gradient at B = 1,000,
  M = 3, D = 16 took 1.8 s instead of 2.6 s on the shared 2-core CPU), else jnp.linalg.det."""
  m = g.shape[-1]
  if m == 1:
    return g[..., 0, 0]
  if m == 2:
    return g[..., 0, 0] * g[..., 1, 1] - g[..., 0, 1] * g[..., 1, 0]
  if m == 3:
    return (g[..., 0, 0] * (g[..., 1, 1] * g[..., 2, 2] - g[..., 1, 2] * g[..., 2, 1])
            - g[..., 0, 1] * (g[..., 1, 0] * g[..., 2, 2] - g[..., 1, 2] * g[..., 2, 0])
            + g[..., 0, 2] * (g[..., 1, 0] * g[..., 2, 1] - g[..., 1, 1] * g[..., 2, 0]))
  return jnp.linalg.det(g)


def _volume_of_gram(g, eps):
  return jnp.sqrt(jnp.maximum(_det(g), 0.0) + eps)


def gram_volume(zs: Sequence, eps: float = VOLUME_EPS):
  """[B] volume spanned by the M vectors of each row: sqrt(max(det G, 0) + eps), G [M, M]
  their Gram matrix (GRAM utils/volume.py takes sqrt(|det G|))."""
  x = jnp.stack(_check_zs(zs), axis=1)  # [B, M, D]
  return _volume_of_gram(jnp.einsum("bmd,bnd->bmn", x, x), eps)


def _cross_volume(single, group, eps):
  """[K, Q]: volume of (single[k], group[0][q], ..., group[-1][q]) (`volume_computation`)."""
  k, q = single.shape[0], group[0].shape[0]
  ss = jnp.broadcast_to(jnp.sum(single * single, -1)[:, None], (k, q))
  sg = [single @ g.T for g in group]
  gg = [[jnp.broadcast_to(jnp.sum(a * c, -1)[None, :], (k, q)) for c in group] for a in group]
  rows = [jnp.stack([ss] + sg, -1)] + [jnp.stack([sg[i]] + gg[i], -1) for i in range(len(group))]
  return _volume_of_gram(jnp.stack(rows, -2), eps)  # from G [K, Q, M, M]


def _gram_core(local_zs, all_zs, local_valid, all_valid, t, extra, row_offset, *, anchor,
               label_smoothing, eps):
  del extra  # GRAM has no random state
  b, n = local_zs[0].shape[0], all_zs[0].shape[0]
  split = lambda zs: (zs[anchor], [z for m, z in enumerate(zs) if m != anchor])
  (a_loc, o_loc), (a_all, o_all) = split(local_zs), split(all_zs)
  diag = (row_offset + jnp.arange(b))[:, None] == jnp.arange(n)[None, :]
  col_ok = (all_valid > 0)[None, :]
  total = 0.0
  # anchor rows -> all candidate tuples; tuple rows -> all anchors (forward_ret's volume, volumeT)
  for logits in (-t * _cross_volume(a_loc, o_all, eps), -t * _cross_volume(a_all, o_loc, eps).T):
    pos = jnp.sum(jnp.where(diag, logits, 0.0), axis=1)
    ce = _row_ce(logits, pos, col_ok, label_smoothing)
    total = total + jnp.sum(jnp.where(local_valid > 0, ce, 0.0))
  return total / 2.0


def gram_loss(zs: Sequence, t, *, anchor: int = 0, valid=None, strategy: str = "local",
              mesh=None, batch_axes: Sequence[str] | str = ("data", "fsdp"),
              label_smoothing: float = 0.1, eps: float = VOLUME_EPS):
  """GRAM volume contrastive loss (module docstring): the mean of the two directions'
  cross-entropies of logits -t * volume(zs[anchor][i], other modalities of j).

  Args:
    zs: M >= 2 global [B, D] embeddings. t: exp'd logit scale, 1 / GRAM's contra_temp.
    anchor: index of the anchor modality in zs. valid: optional [B] mask.
    strategy: "local" | "all_gather". label_smoothing: GRAM uses 0.1.
    eps: added to det G before the square root.
  """
  _check_strategy(strategy)
  zs = _check_zs(zs)
  if not -len(zs) <= anchor < len(zs):
    raise ValueError(f"gram anchor {anchor} is not an index of the {len(zs)} modalities")
  core = functools.partial(_gram_core, anchor=anchor % len(zs), label_smoothing=label_smoothing,
                           eps=eps)
  return _run(core, zs, _valid(valid, zs[0].shape[0]), _scalar(t), (),
              strategy=strategy, mesh=mesh, batch_axes=batch_axes)


def gram_scores(query_zs: Sequence, candidates, eps: float = VOLUME_EPS):
  """[Q, K] minus the volume spanned by each query's M - 1 vectors (list of [Q, D]) and each
  candidate [K, D] of the missing modality (GRAM evaluation ranks by -volume)."""
  return -_cross_volume(jnp.asarray(candidates, jnp.float32), _query(query_zs), eps).T
