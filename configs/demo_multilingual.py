r"""Demo: a multilingual SigLIP on emoji named in 14 languages (or digits in 8), on a 2-core CPU.

The SigLIP demo (configs/demo.py) trained on data/emoji_multilingual.py's `train` split: the
Noto Color Emoji renders of 1,102 emoji, each captioned with its CLDR name in each of 14
languages (one record per emoji and language), tokenized by data/multilingual_spm.model (a
4,000-piece SentencePiece model with byte fallback trained by tools/make_tokenizer.py on both
multilingual datasets' training captions, language temperature 3.3; README.md gives the
command). Evaluated per language on the 275 held-out emoji, in the training art style (`test`)
and in another one (`openmoji_test`, OpenMoji): zero-shot classification among the 275 names
in each language, image<->text retrieval per language, and cross-lingual text->text retrieval
(a name in language A finds the same emoji's name in language B); and on the 1,102 training
emoji drawn in the OpenMoji style (`openmoji_train`: concepts seen in training, art never
seen), zero-shot among their 1,102 names and retrieval per language.

Commands (from the repo root, after `python data/build_demo.py --multilingual`, which needs the
Debian package fonts-noto-color-emoji), the runs of the multilingual table in README.md:

  python -m big_mm.train --config configs/demo_multilingual.py --workdir /tmp/ml_emoji
  python -m big_mm.train --config configs/demo_multilingual.py:langs=en --workdir /tmp/ml_emoji_en
  python -m big_mm.train --config configs/demo_multilingual.py:data=digits --workdir /tmp/ml_dig
  python -m big_mm.train --config configs/demo_multilingual.py:data=digits,langs=en \
      --workdir /tmp/ml_dig_en

Hardware: any CPU (2 cores). Expected result: the multilingual model's zero-shot accuracy in
every language well above chance (1/275 for emoji, 1/10 for digits) and above the English-only
baseline's outside English; README.md has the measured numbers.

Arguments (`configs/demo_multilingual.py:data=digits,langs=en`): data (emoji|digits), langs
(all: every language of the data; en: train on the English records only, the baseline; the
evaluation is always in every language), temperature (input.language_temperature; both
datasets have every language equally often, so it only matters for other data), steps, batch.
"""
from big_mm import config as config_lib
from configs import demo
from data import digits_multilingual, emoji_multilingual

PP = "decode|resize(32)|value_range(-1,1)"  # emoji training (no crop) and every evaluation


def _evals(data: str) -> dict:
  """Per-language zero-shot and retrieval on the held-out split(s), at the end of the run."""
  if data == "emoji":
    langs = emoji_multilingual.LANGUAGES
    zeroshot = {split: dict(classnames={l: tuple(emoji_multilingual.names(split, l))
                                        for l in langs}, templates=("{}",))
                for split in ("test", "openmoji_test", "openmoji_train")}
    splits = {"": "test", "_openmoji": "openmoji_test", "_seen_openmoji": "openmoji_train"}
    name = "emoji_multilingual"
  else:
    langs = digits_multilingual.LANGUAGES
    zeroshot = {"test": dict(classnames={l: digits_multilingual.words(l) for l in langs},
                             templates={l: digits_multilingual.prompts(l) for l in langs})}
    splits = {"": "test"}
    name = "digits_multilingual"
  evals = {}
  for suffix, split in splits.items():
    common = dict(data=name, split=split, pp_image=PP, languages=langs)
    evals["zeroshot" + suffix] = dict(type="zeroshot", **common, **zeroshot[split])
    # Cross-lingual retrieval is text-only: the same on every split of the same names.
    evals["retrieval" + suffix] = dict(type="retrieval", **common, cross_lingual=suffix == "")
  return evals


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="emoji", langs="all", temperature=1.0, steps=1000,
                             batch=128)
  if arg.data not in ("emoji", "digits"):
    raise config_lib.ConfigError(f"demo_multilingual: data={arg.data!r}; use emoji or digits.")
  if arg.langs not in ("all", "en"):
    raise config_lib.ConfigError(f"demo_multilingual: langs={arg.langs!r}; use all or en.")
  c = demo.get_config(f"steps={arg.steps},batch={arg.batch}")
  c.input.data = f"{arg.data}_multilingual"
  c.input.tokenizer = "data/multilingual_spm.model"
  if arg.data == "emoji":  # digits keep the demo's random crop
    c.input.pp_image = PP
  c.input.text_len = 16
  c.input.language_column = "language"
  c.input.language_temperature = float(arg.temperature)
  if arg.langs == "en":
    c.input.languages = ("en",)
  c.model.towers.text.vocab_size = 4000
  c.evals = _evals(arg.data)
  c.checkpoint = dict(every_steps=500, keep=1)
  return c
