r"""Export a big_mm run to Hugging Face transformers, open_clip or a big_vision-style npz.

  python tools/export.py --config configs/demo.py[:args] [--config.x=y ...] \
      --workdir /tmp/big_mm_demo [--step N] --format hf|open_clip|npz --out DIR_OR_FILE \
      [--arch siglip|clip] [--image_size N]

The run's config is needed (a workdir does not store it): pass the same --config and
overrides as for training. --arch defaults to siglip for objective.loss=sigmoid and clip for
softmax. hf writes config.json + model.safetensors + the tokenizer and image processor
(AutoProcessor / SiglipProcessor); open_clip writes a directory for
open_clip.create_model_and_transforms / get_tokenizer("local-dir:DIR"); npz writes one array
per '/'-joined param path.
Models the target cannot represent exactly are refused with the list of differences.
"""
from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from big_mm import checkpoint as checkpoint_lib  # noqa: E402
from big_mm import config as config_lib  # noqa: E402
from big_mm import export  # noqa: E402

FLAGS = ("config", "workdir", "step", "format", "out", "arch", "image_size")


def image_size_from_pp(pp: str | None) -> int | None:
  """The size of the last resize / crop op of a pp string (e.g. 'decode|resize(32)|...')."""
  size = None
  for op in (pp or "").split("|"):
    m = re.fullmatch(r"\s*(resize|central_crop|random_crop)\((\d+)\)\s*", op)
    if m:
      size = int(m.group(2))
  return size


def eval_pp(config) -> str | None:
  for ev in config.evals.values():
    if ev.get("pp_image"):
      return ev.pp_image
  return config.input.pp_image


def check_pp(pp: str | None) -> str | None:
  """A warning when the eval preprocessing is not what the exported processor reproduces."""
  ops = [op.strip() for op in (pp or "").split("|") if op.strip()]
  other = [op for op in ops if not (op == "decode" or re.fullmatch(r"resize\(\d+\)", op)
                                    or op.replace(" ", "") in ("value_range(-1,1)",
                                                               "value_range(-1.0,1.0)"))]
  if other:
    return (f"Warning: eval pp_image {pp!r} has ops {other} that the exported processor does not "
            "reproduce (it does resize(S) + value_range(-1,1) only); preprocess yourself.")
  return None


def restore_params(workdir: str, step: int | None):
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No checkpoints directory in workdir {workdir!r}.")
  ckpt = checkpoint_lib.Checkpointer(directory, keep=None, save_every_steps=1,
                                     async_save=False, read_only=True)
  try:
    steps = ckpt.all_steps()
    if step is not None and step not in steps:
      raise ValueError(f"No checkpoint for step {step} in {directory!r}; available: {steps}.")
    step = step if step is not None else ckpt.latest_step()
    if step is None:
      raise ValueError(f"No checkpoints in {directory!r}.")
    return ckpt.restore_params(step), step
  finally:
    ckpt.close()


def run(config, workdir, fmt, out, *, step=None, arch=None, image_size=None) -> str:
  if fmt not in export.FORMATS:
    raise ValueError(f"--format must be one of {export.FORMATS}; got {fmt!r}.")
  params, step = restore_params(workdir, step)
  if fmt == "npz":
    return export.export_npz(params, out)
  model_kwargs = config.model.to_dict()
  warning = check_pp(eval_pp(config))
  if warning:
    print(warning, file=sys.stderr)
  image_size = image_size or image_size_from_pp(eval_pp(config))
  if fmt == "hf":
    arch = arch or ("siglip" if config.objective.get("loss", "sigmoid") == "sigmoid" else "clip")
    return export.export_hf(params, model_kwargs, out, arch=arch,
                            tokenizer=config.input.tokenizer, image_size=image_size)
  return export.export_open_clip(params, model_kwargs, out, image_size=image_size,
                                 tokenizer=config.input.tokenizer)


def main(argv):
  flags, overrides = config_lib.parse_command_line(argv)
  unknown = set(flags) - set(FLAGS)
  missing = {"config", "workdir", "format", "out"} - set(flags)
  if unknown or missing:
    print(f"{'Unknown flags ' + str(sorted(unknown)) if unknown else ''}"
          f"{' Missing flags ' + str(sorted(missing)) if missing else ''}\n{__doc__}",
          file=sys.stderr)
    return 2
  config = config_lib.load(flags["config"], overrides)
  try:
    out = run(config, flags["workdir"], flags["format"], flags["out"],
              step=int(flags["step"]) if "step" in flags else None, arch=flags.get("arch"),
              image_size=int(flags["image_size"]) if "image_size" in flags else None)
  except (ValueError, FileNotFoundError) as e:
    print(f"Export failed: {e}", file=sys.stderr)
    return 1
  print(f"Exported {flags['workdir']} to {out} ({flags['format']}).")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
