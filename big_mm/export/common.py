"""Shared helpers for export / import: flat '/'-path trees, scan layouts, model kwargs, errors."""
from __future__ import annotations

import contextlib
import importlib
import os
import re
import shutil
import tempfile
from typing import Any, Mapping

import jax
import numpy as np

from big_mm import tree_paths


class ExportError(ValueError):
  """A model that cannot be represented in the target format, or bad input files."""


def requires(*modules: str, what: str):
  """Imports `modules` (returned in order) or raises ExportError naming the export extra."""
  try:
    return [importlib.import_module(m) for m in modules]
  except ImportError as e:
    raise ExportError(f"{what} needs {e.name!r}, which `pip install -e .` does not install: "
                      "pip install -e \".[export]\" (safetensors, transformers, torch, timm)."
                      ) from None


def load_torch_weights(path: str) -> dict[str, np.ndarray]:
  """A torch state dict file (.bin / .pt) read with torch.load(weights_only=True): tensors and
  plain containers only, never arbitrary pickled objects; anything else is refused."""
  torch, = requires("torch", what=f"Reading {os.path.basename(path)}")
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - torch raises several types; all mean "refused"
    raise ExportError(
        f"{path!r} cannot be read with torch.load(weights_only=True) ({type(e).__name__}: "
        f"{str(e).splitlines()[0][:300]}). big_mm never unpickles arbitrary objects (nor loads "
        "TorchScript archives such as OpenAI's original ViT-B-32.pt): use the safetensors file "
        "open_clip / the Hugging Face hub publish, or convert it where you trust the file.") from None
  if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
    state = state["state_dict"]  # open_clip training checkpoints
  if not isinstance(state, Mapping):
    raise ExportError(f"{path!r} holds a {type(state).__name__}, not a state dict.")
  return {k[len("module."):] if k.startswith("module.") else k:
          v.float().numpy() for k, v in state.items() if hasattr(v, "float")}


@contextlib.contextmanager
def atomic_dir(out_dir: str):
  """Yields a fresh directory beside `out_dir`; on success it replaces `out_dir` (a rename), on
  any error it is removed, so `out_dir` never holds a half-written export."""
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".partial-", dir=parent)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if os.path.exists(out_dir):
    old = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".old-", dir=parent)
    os.rename(out_dir, os.path.join(old, "x"))
  os.rename(tmp, out_dir)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def flatten(tree: Any) -> dict[str, np.ndarray]:
  """Nested dict of arrays -> {'a/b/c': np.ndarray} (float32 kept as is, on the host)."""
  if isinstance(tree, Mapping) and tree and not any(isinstance(v, Mapping)
                                                     for v in tree.values()):
    return {str(k): np.asarray(jax.device_get(v)) for k, v in tree.items()}  # already flat
  return {name: np.asarray(jax.device_get(leaf))
          for name, leaf in tree_paths.flat_dict(tree).items()}


def unflatten(flat: Mapping[str, Any]) -> dict:
  """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
  tree: dict = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


_SCANNED = re.compile(r"^(.*)/encoderblock/(.*)$")


def unstack_layers(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """scan=True layout (`.../encoderblock/...` with a leading layers axis) -> `encoderblock_{i}`."""
  out = {}
  for k, v in flat.items():
    m = _SCANNED.match(k)
    if m:
      for i in range(v.shape[0]):
        out[f"{m.group(1)}/encoderblock_{i}/{m.group(2)}"] = np.asarray(v[i])
    else:
      out[k] = v
  return out


_BLOCK = re.compile(r"^(.*)/encoderblock_(\d+)/(.*)$")


def stack_layers(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`encoderblock_{i}` layout -> scan=True layout (leading layers axis)."""
  groups: dict[tuple[str, str], dict[int, np.ndarray]] = {}
  out = {}
  for k, v in flat.items():
    m = _BLOCK.match(k)
    if m:
      groups.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = v
    else:
      out[k] = v
  for (prefix, rest), by_layer in groups.items():
    out[f"{prefix}/encoderblock/{rest}"] = np.stack([by_layer[i] for i in sorted(by_layer)])
  return out


def num_layers(flat: Mapping[str, np.ndarray], prefix: str) -> int:
  ids = {int(m.group(2)) for k in flat for m in [_BLOCK.match(k)] if m and m.group(1) == prefix}
  if ids and ids != set(range(len(ids))):
    raise ExportError(f"{prefix}: encoder blocks are not numbered 0..n-1: {sorted(ids)}.")
  return len(ids)


def model_kwargs(config) -> dict:
  """config.model (ConfigDict or dict; the former two_towers layout too) -> plain dict of
  Towers kwargs with an image and a text tower (what the exported formats hold)."""
  from big_mm.models import towers
  m = config.model if hasattr(config, "model") else config
  m = dict(m.to_dict() if hasattr(m, "to_dict") else m)
  refuse_video(m, config.get("objective") if hasattr(config, "model") else None)
  if "towers" not in m:
    m = towers.from_two_towers(m)
  m["towers"] = {k: dict(v or {}) for k, v in dict(m["towers"]).items()}
  if sorted(m["towers"]) != ["image", "text"]:
    raise ExportError(f"Exports hold an image and a text tower; this model's towers are "
                      f"{sorted(m['towers'])}.")
  return m


def towers_params(params: Mapping[str, Any], model_kwargs_: Mapping) -> tuple[dict, list[str]]:
  """(the towers model's params: its towers' scopes and t / b, the other top-level scopes'
  names). A run's checkpoint may hold training-only scopes beside the towers (SigLIP 2's LocCa
  decoder `dec`, its self-distillation heads `sd`); exports keep the towers, as SigLIP 2
  releases only the encoders."""
  from big_mm import modalities  # pylint: disable=g-import-not-at-top
  refuse_moe(params, "an HF / open_clip export")  # before any scope (LIMoE's shared/) is left out
  keep = {modalities.get(m).scope for m in model_kwargs_["towers"]} | {"t", "b"}
  return ({k: v for k, v in params.items() if k in keep},
          sorted(k for k in params if k not in keep))


def resolved_arch(model_kwargs_: Mapping) -> tuple[dict, dict, tuple]:
  """(image options, text options, (img_dim, txt_dim)) with every default filled in, as the
  modules themselves resolve them (variants, mlp_dim = 4 * width, Towers head defaults)."""
  from big_mm.models.towers import Towers
  model = Towers(**model_kwargs_)
  dims = model.out_dims()

  def opts(modality):
    cls, kwargs = model.tower_kwargs(modality)
    mod = cls(**kwargs)
    fields = {f: getattr(mod, f) for f in mod.__dataclass_fields__ if f not in ("parent", "name")}
    fields.update(mod.arch())
    fields.update(mod.pooling())  # pool_type (big_vision's names) resolved to big_mm's pool
    return fields

  return opts("image"), opts("text"), (dims["image"], dims["text"])


def refuse_video(model: Mapping, objective: Mapping | None = None) -> None:
  """Refuses a model with a video tower (config.model: a towers entry for a video modality or
  with a video tower, or a captioner / CoCa whose model.image["tower"] is one or whose
  objective.modality is video): the HF and open_clip formats hold image and text towers only."""
  from big_mm import modalities  # pylint: disable=g-import-not-at-top

  def is_video(name):
    return name in modalities.MODALITIES and modalities.get(name).kind == modalities.VIDEO

  video_towers = {mod.tower for mod in modalities.MODALITIES.values()
                  if mod.kind == modalities.VIDEO}
  found = [f"model.towers.{m}" for m, kw in dict(model.get("towers") or {}).items()
           if is_video(m) or dict(kw or {}).get("tower") in video_towers]
  encoder = dict(model.get("image") or {}).get("tower")
  if encoder in video_towers or is_video(dict(objective or {}).get("modality")):
    found.append(f"model.image (tower {encoder or 'vit'!r} over video)")
  if found:
    raise ExportError(
        f"This big_mm model has a video tower ({', '.join(found)}), which --format hf / "
        "open_clip cannot hold: Hugging Face SigLIP / CLIP and open_clip models have image and "
        "text towers only (no tubelet embedding, time position embedding or averaging of test "
        "views), so no exported file would compute it. Keep the big_mm checkpoint (WORKDIR: "
        "big_mm.evaluate runs it; config.init.workdir starts a run from it), or --format npz "
        "for its params alone (every param kept, no architecture; config.init.path and "
        "export.load_params read it back).")


_MOE_LAYER = re.compile(r"^(.*?(?:^|/)MoeMlp_\d+)/")


def refuse_moe(params: Mapping[str, Any], target: str) -> None:
  """Refuses params (nested or flat) with mixture-of-experts MLPs (a `MoeMlp_k` scope,
  big_mm/models/moe.py): the blocks of HF SigLIP / CLIP, open_clip and big_vision's ViT have one
  dense MLP and no router, so any mapping (one expert, their mean) would compute a different
  model."""
  layers = sorted({m.group(1) for k in tree_paths.flat_dict(params)
                   for m in [_MOE_LAYER.match(k)] if m})
  if layers:
    raise ExportError(
        f"This big_mm model has mixture-of-experts MLPs ({len(layers)} MoE layers, e.g. "
        f"{layers[0]!r}), which {target} cannot represent: its transformer blocks have one dense "
        "MLP and no router, so exporting one expert or an average of them would compute a "
        "different model. Export with --format npz (export.export_npz: big_mm's own format, "
        "every param kept; config.init.path and export.load_params read it back) and run the "
        "model with big_mm, or train dense towers (no `moe` in model.towers) for this format.")


def check_refusals(problems: list[str], target: str) -> None:
  if problems:
    raise ExportError(
        f"This big_mm model cannot be exported exactly to {target}; it would compute something "
        "different. Differences:\n  - " + "\n  - ".join(problems) +
        "\n(Use --format npz to keep every big_mm option.)")


def compare_keys(have: Mapping[str, Any], want: Mapping[str, tuple], what: str) -> None:
  """Raises ExportError listing missing / unexpected keys and shape mismatches."""
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  shapes = [f"{k}: got {tuple(np.shape(have[k]))}, expected {tuple(want[k])}"
            for k in sorted(set(want) & set(have))
            if tuple(np.shape(have[k])) != tuple(want[k])]
  if missing or extra or shapes:
    lines = []
    if missing:
      lines.append(f"missing ({len(missing)}): {missing[:20]}")
    if extra:
      lines.append(f"unexpected ({len(extra)}): {extra[:20]}")
    if shapes:
      lines.append(f"shape mismatches ({len(shapes)}): {shapes[:20]}")
    raise ExportError(f"{what} differ:\n  " + "\n  ".join(lines))
