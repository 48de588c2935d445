r"""Export a big_mm run to Hugging Face transformers, open_clip or a big_vision-style npz.

Usage:
  python tools/export.py --workdir DIR --format hf|open_clip|npz --out DIR_OR_FILE [--step N]
      [--arch siglip|siglip2|clip] [--image_size N] [--embed_dim K] [--config PATH.py[:ARG]]
      [--config.a.b=VALUE ...]

Example (the demo run of `python -m big_mm.train --help`):
  python tools/export.py --workdir /tmp/big_mm_demo --format hf --out /tmp/demo_hf

Flags:
  --workdir     a run of big_mm.train: its checkpoints and stored config (WORKDIR/config.json)
  --format      hf: config.json + model.safetensors + the tokenizer and image processor
                (AutoProcessor / SiglipProcessor); open_clip: a directory for
                open_clip.create_model_and_transforms / get_tokenizer("local-dir:DIR");
                npz: one array per '/'-joined param path
  --out         the directory (hf, open_clip) or .npz file to write
  --step        the checkpoint's step (default: the newest)
  --arch        hf only: siglip, siglip2 (NaFlex: Siglip2Model) or clip (default: siglip for
                objective.loss=sigmoid, clip for softmax)
  --image_size  the processor's image size (default: the eval pp's last resize / crop)
  --embed_dim   write the model whose embedding is the first K dims, re-normalised (a
                Matryoshka run's prefix, objective.matryoshka_dims): the towers' head kernels
                are truncated; a tower without a head is refused (big_mm/export/matryoshka.py)
  --config      a recipe to use instead of the stored config (the keys that differ from the
                stored one are logged); --config.a.b=VALUE overrides either
  --debug       shows the traceback of a user error too
Models the target cannot represent exactly are refused with the list of differences;
mixture-of-experts towers (model.towers.*.moe) export to npz only (hf / open_clip have no MoE MLP).
"""
from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from big_mm import cli, export  # noqa: E402
from big_mm.export import common as export_common  # noqa: E402
from big_mm.export import matryoshka  # noqa: E402
from big_mm.input import tokenizer as tokenizer_lib  # noqa: E402
from big_mm.cli import restore_params  # noqa: E402

FLAGS = ("config", "workdir", "step", "format", "out", "arch", "image_size", "embed_dim")


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


def run(config, workdir, fmt, out, *, step=None, arch=None, image_size=None,
        embed_dim=None) -> str:
  if fmt not in export.FORMATS:
    raise export.ExportError(f"--format must be one of {export.FORMATS}; got {fmt!r}.")
  params, step = restore_params(workdir, step)
  model_kwargs = config.model.to_dict()
  if embed_dim:
    params, model_kwargs = matryoshka.truncate_embedding(params, model_kwargs, embed_dim)
    trained = tuple(config.objective.get("matryoshka_dims", ()))
    if embed_dim not in trained:
      print(f"Warning: --embed_dim={embed_dim} is not one of the dims this run trained "
            f"(objective.matryoshka_dims={trained}); its truncated embedding may be much worse "
            "than the full one.", file=sys.stderr)
  if fmt == "npz":
    return export.export_npz(params, out)
  params, dropped = export_common.towers_params(params, export_common.model_kwargs(config))
  if dropped:
    print(f"Exporting the towers only; left out the training-only param scopes {dropped}.",
          file=sys.stderr)
  warning = check_pp(eval_pp(config))
  if warning:
    print(warning, file=sys.stderr)
  image_size = image_size or image_size_from_pp(eval_pp(config))
  # The .model file itself (input.tokenizer may name a Hugging Face tokenizer directory).
  tokenizer = tokenizer_lib.model_path(config.input.tokenizer) if config.input.tokenizer else None
  if fmt == "hf":
    arch = arch or ("siglip" if config.objective.get("loss", "sigmoid") == "sigmoid" else "clip")
    return export.export_hf(params, model_kwargs, out, arch=arch,
                            tokenizer=tokenizer, image_size=image_size)
  return export.export_open_clip(params, model_kwargs, out, image_size=image_size,
                                 tokenizer=tokenizer)


def main(argv):
  return cli.main(_run_command_line, argv, doc=__doc__, flags=FLAGS,
                  required=("workdir", "format", "out"))


def _run_command_line(flags, overrides) -> int:
  config = cli.config_for_workdir(flags["workdir"], flags.get("config"), overrides)
  out = run(config, flags["workdir"], flags["format"], flags["out"],
            step=cli.int_flag(flags, "step"), arch=flags.get("arch"),
            image_size=cli.int_flag(flags, "image_size"),
            embed_dim=cli.int_flag(flags, "embed_dim"))
  print(f"Exported {flags['workdir']} to {out} ({flags['format']}).")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
