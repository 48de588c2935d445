"""Pytree key paths as '/'-joined names ('img/embedding/kernel'): the parameter names that
optim's `lr_mults` / `wd_mask` regexes, `config.init.include`, exports and checkpoint messages
use, so they must stay the same everywhere."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax


def key_str(key: Any) -> str:
  """One entry of a jax key path as a string: a dict key, attribute name or sequence index."""
  for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: Sequence[Any]) -> str:
  """A key path as its '/'-joined name ('' for the root)."""
  return "/".join(key_str(k) for k in path)


def flat_dict(tree: Any, is_leaf: Optional[Callable[[Any], bool]] = None) -> dict[str, Any]:
  """{'/'-joined path: leaf} in tree-flatten order."""
  return {path_str(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)}


def dict_keys(path: Sequence[Any]) -> tuple[str, ...]:
  """The dict keys of a key path, without its sequence indices and attribute names (an optax
  state's `mu` tree is then addressed by its params' names)."""
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
