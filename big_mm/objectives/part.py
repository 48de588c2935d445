"""The contract of a SigLIP 2 loss term (big_mm/objectives/siglip2.py): LocCa, self-distillation
and teacher distillation are `Part`s the siglip2 objective adds to its contrastive loss."""
from __future__ import annotations


class Part:
  """One term of the SigLIP 2 loss besides the contrastive one. A part declares
    NAME                       its key (and the key of its extra state)
    SETTINGS = dict(...)       its `config.objective` keys (prefixed with its name, e.g.
                               locca_weight); merged into Siglip2.SETTINGS
    check_settings(settings)   (classmethod) ConfigError for a bad value of its keys
    BATCH_KEYS = (...)         the batch keys it reads (besides the towers')
  and is built as `cls(objective, settings)` with the objective's filled settings. It provides
    enabled                                   False: the part adds nothing (weights 0)
    example_batch() -> {key: ShapeDtypeStruct}  its batch keys, for init (may be empty)
    init_params(rng, towers_params) -> {scope: boxed params}   its own param subtrees
    init_extra(params) -> pytree | None       its extra train state (None: none)
    update_extra(extra, params, step, stats=None) -> extra  after each update (default:
                                              unchanged); stats: what its loss put under
                                              metrics[base.EXTRA_STATS] (when it did)
    loss(params, batch, rng, fwd, *, extra, step) -> (weighted loss, metrics)
    predict_fns() -> {name: value}            attributes it installs on the objective (e.g.
                                              LocCa's decoding API; default: none)
  where fwd is the student's training forward pass: {"z": {modality: [B, D]}, "out": the
  towers' out dict ("img/encoded" [B, N, D] tokens, "img/token_mask" with a patch mask, "t",
  "b", ...), "inputs": {modality: model input}, "model": the towers module that ran (patch
  dropout on or off)}.
  """
  NAME = ""
  SETTINGS: dict = {}
  BATCH_KEYS: tuple = ()

  def __init__(self, objective, settings: dict):
    self.objective = objective
    self.settings = settings

  @classmethod
  def check_settings(cls, settings) -> None:
    del settings

  @property
  def enabled(self) -> bool:
    return False

  def example_batch(self) -> dict:
    return {}

  def init_params(self, rng, towers_params) -> dict:
    del rng, towers_params
    return {}

  def init_extra(self, params):
    del params

  def update_extra(self, extra, params, step, stats=None):
    del params, step, stats
    return extra

  def loss(self, params, batch, rng, fwd, *, extra, step):
    raise NotImplementedError

  def predict_fns(self) -> dict:
    return {}
