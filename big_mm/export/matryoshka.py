"""Truncated embeddings for export: the model whose embedding is the first `dim` features of a
Matryoshka (MRL) model's, re-normalised (tools/export.py --embed_dim).

  params, model_kwargs = truncate_embedding(params, config.model.to_dict(), 32)

A tower with a head (model.out_dim set for it) computes z = normalise(x @ W + b); keeping the
first `dim` columns of W and entries of b gives normalise((x @ W + b)[:dim]), which is exactly
the re-normalised prefix the MRL loss and evaluators use, in every format (npz, hf, open_clip).
A tower without a head (out_dim 0 / None: its embedding is the pooled features themselves,
e.g. HF SigLIP's image tower, whose embedding is the MAP head's output) cannot be truncated by
slicing parameters, so it is refused with that reason.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from big_mm import modalities
from big_mm.export.common import ExportError


def truncate_embedding(params: Mapping[str, Any], model_kwargs: Mapping[str, Any],
                       dim: int) -> tuple[dict, dict]:
  """(params, model kwargs) of the model embedding in the first `dim` features of every tower's
  head (re-normalised); `params` is the nested tree (not modified), model_kwargs Towers'."""
  from big_mm.models.towers import Towers  # pylint: disable=g-import-not-at-top
  out_dims = Towers(**model_kwargs).out_dims()
  if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
    raise ExportError(f"--embed_dim must be a positive integer; got {dim!r}.")
  headless = [m for m, d in out_dims.items() if not d]
  if headless:
    raise ExportError(
        f"--embed_dim={dim}: the {headless} tower(s) have no head (model.out_dim "
        f"{dict(out_dims)}), so their embedding is the pooled features themselves (e.g. the MAP "
        "head's output, as HF SigLIP's image embedding is), which no slice of the parameters "
        "truncates. Only towers with a head (x @ W + b, whose first columns are kept) can be "
        "exported truncated; truncate such embeddings after the model instead (z[:, :dim], "
        "re-normalised).")
  too_small = {m: d for m, d in out_dims.items() if d < dim}
  if too_small:
    raise ExportError(f"--embed_dim={dim} is larger than the embedding dim {too_small}.")
  params = {k: v for k, v in params.items()}
  for m in out_dims:
    scope = modalities.get(m).scope
    head = dict(params[scope]["head"])
    head["kernel"] = np.asarray(head["kernel"])[..., :dim]
    if "bias" in head:
      head["bias"] = np.asarray(head["bias"])[:dim]
    params[scope] = {**params[scope], "head": head}
  model_kwargs = dict(model_kwargs)
  model_kwargs["out_dim"] = (dim if not isinstance(model_kwargs.get("out_dim"), Mapping)
                             else {m: dim for m in model_kwargs["out_dim"]})
  return params, model_kwargs
