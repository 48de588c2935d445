"""Every objective refuses `objective.*` options it does not read, so none is silently ignored."""
from __future__ import annotations

from big_mm import config as config_lib

# The objective.* keys each objective reads (besides `name`). A key read by none is a bug:
# tests/test_contrastive.py checks that every default key is listed here.
READS = {
    "contrastive": ("loss", "strategy", "implementation", "micro_batches"),
    "captioning": ("parallel_fraction", "label_smoothing"),
    "coca": ("loss", "strategy", "implementation", "label_smoothing", "contrastive_weight",
             "caption_weight"),
    "multimae": ("num_visible", "dirichlet_alpha", "modality_weights"),
}
_HINTS = {"micro_batches": "GradCache is implemented for the contrastive objective only"}


def _canonical(value):
  if isinstance(value, (list, tuple)):
    return tuple(_canonical(v) for v in value)
  return value


def refuse_unused(config, name: str) -> None:
  """Raises ConfigError for any objective.* key that `name` does not read and that differs
  from its default (big_mm.config.defaults())."""
  defaults = config_lib.defaults().objective
  for key, value in config.objective.items():
    if key == "name" or key in READS[name] or key not in defaults:
      continue
    default = defaults[key]
    if _canonical(value) == _canonical(default):
      continue
    readers = sorted(n for n, keys in READS.items() if key in keys)
    hint = _HINTS.get(key, f"it is read only by objective.name in {readers}")
    raise config_lib.ConfigError(
        f"objective.{key}={value!r} would be ignored: {hint}, not {name!r} (which reads "
        f"objective.{', '.join(READS[name])}). Remove it or set it back to its default "
        f"{default!r}.")
