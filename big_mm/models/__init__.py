"""Models. Lookups are explicit: `MODELS[name]` / `get_model(name, **kwargs)`."""
import difflib

from big_mm.models import captioner, fourm, limoe, lm, multimae, towers, videomae, vq
from big_mm.models.vit import check_kwargs

MODELS = {
    "towers": towers.Towers,
    "captioner": captioner.Captioner,
    "coca": captioner.CoCa,
    "multimae": multimae.MultiMAE,
    "fourm": fourm.FourM,
    "limoe": limoe.LIMoE,
    "vq_tokenizer": vq.VQTokenizer,
    "lm": lm.LanguageModel,
    "videomae": videomae.VideoMAE,
}


def get_model(name: str, **kwargs):
  """Instantiates MODELS[name](**kwargs); unknown names raise ValueError with the valid ones."""
  if name not in MODELS:
    close = difflib.get_close_matches(str(name), list(MODELS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown model {name!r}.{hint} Valid models: {', '.join(sorted(MODELS))}.")
  check_kwargs(MODELS[name], kwargs, f"model ({name})")
  return MODELS[name](**kwargs)
