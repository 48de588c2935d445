"""Class names and prompt templates of the zero-shot evaluators (zeroshot, scoring), given in
the config either as lists or by the name of a list big_mm ships:

  evals.imagenet = dict(type="zeroshot", data="imagenet2012", split="validation",
                        classnames="imagenet2012", templates="clip80")

CLASSNAMES / TEMPLATES map those names to the lists (big_mm/evaluators/imagenet.py says where
each comes from). The config keeps the name; evaluators resolve it when they are built.

Per language (zeroshot with `languages`): a dict {language: names} / {language: templates}, or
one value every language shares (by_language).
"""
from __future__ import annotations

import collections.abc
import difflib

import ml_collections

from big_mm import config as config_lib
from big_mm.evaluators import imagenet

CLASSNAMES = {
    "imagenet2012": imagenet.CLASSNAMES,  # CLIP's curated names, by ImageNet-1k label id
}
TEMPLATES = {
    "clip80": imagenet.CLIP_TEMPLATES,  # the CLIP paper's 80 ImageNet templates
    "clip7": imagenet.CLIP_TEMPLATES_7,  # CLIP's 7-template subset
}


def _named(key: str, value: str, shipped: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
  if value not in shipped:
    close = difflib.get_close_matches(value, list(shipped), n=2, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise config_lib.ConfigError(
        f"{key}={value!r} names no list big_mm ships; shipped: {sorted(shipped)}.{hint} Or give "
        f"the list itself (a tuple of strings).")
  return shipped[value]


def _strings(key: str, value, what: str) -> tuple[str, ...]:
  if not (isinstance(value, (tuple, list)) and value and all(isinstance(v, str) for v in value)):
    raise config_lib.ConfigError(f"{key} must be {what}, got {value!r}.")
  return tuple(value)


def classnames(key: str, value) -> tuple[str, ...]:
  """evals.X.classnames (`key` names it in errors): a shipped list's name, or the names."""
  if isinstance(value, str):
    return _named(key, value, CLASSNAMES)
  return _strings(key, value, "the class names, one per label id in order (a non-empty tuple "
                  f"of strings), or the name of a shipped list: {sorted(CLASSNAMES)}")


def templates(key: str, value) -> tuple[str, ...]:
  """evals.X.templates: a shipped set's name, or str.format patterns with one "{}" each."""
  if isinstance(value, str):
    return _named(key, value, TEMPLATES)
  what = (f'prompt templates with one "{{}}" each, e.g. ("a photo of a {{}}.",), or the name '
          f"of a shipped set: {sorted(TEMPLATES)}")
  value = _strings(key, value, what)
  for template in value:
    try:
      ok = template.count("{}") == 1 and template.format("") is not None
    except (IndexError, KeyError, ValueError):
      ok = False
    if not ok:
      raise config_lib.ConfigError(f"{key} entry {template!r}: each template must hold exactly "
                                   f'one "{{}}" (where the class name goes) and no other braces.')
  return value


def languages(key: str, value) -> tuple[str, ...]:
  """evals.X.languages: distinct language codes ("en", "ja", ...); () = not per language."""
  value = tuple(value) if isinstance(value, (tuple, list)) else value
  if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
    raise config_lib.ConfigError(f"{key} must be a tuple of language codes like ('en', 'ja'), "
                                 f"got {value!r}.")
  bad = [v for v in value if v == "mean" or "/" in v or "->" in v]
  if bad or len(set(value)) != len(value):
    raise config_lib.ConfigError(
        f"{key}={value!r}: languages must be distinct and none may be 'mean' or hold '/' or "
        f"'->' (they name metrics: <lang>/accuracy, mean/accuracy, <A>-><B>/R@1).")
  return value


def by_language(key: str, value, langs: tuple[str, ...], parse) -> dict[str, tuple[str, ...]]:
  """{language: parse(key, its value)} for evals.X.<key> given as {language: value} (a dict
  holding every language in `langs`; others are ignored) or as one value for all of them."""
  if not is_mapping(value):
    parsed = parse(key, value)
    return {lang: parsed for lang in langs}
  missing = [lang for lang in langs if lang not in value]
  if missing:
    raise config_lib.ConfigError(
        f"{key} has no entry for language(s) {missing} of languages={langs}; give one per "
        f"language ({{'en': ..., 'ja': ...}}) or one value for all of them.")
  return {lang: parse(f"{key}[{lang!r}]", value[lang]) for lang in langs}


def is_mapping(value) -> bool:
  """A dict or a ConfigDict (config.load makes a config's dicts ConfigDicts)."""
  return isinstance(value, (collections.abc.Mapping, ml_collections.ConfigDict))
