#!/usr/bin/env bash
# Downloads (here, where pip reaches an index) the wheels that tools/benchmark.py needs on the
# lent GPU machine beyond its image (jax, flax, optax, orbax, sentencepiece, numpy, pillow,
# scipy are there): Python 3.12, x86-64. tools/gpu_check.sh installs .whl/*.whl if present.
# Run from the repository root; .whl/ is git-ignored (add `/.whl/` to .git/info/exclude) and
# travels with `carry: [".whl"]`.
set -eu
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 \
  googleapis-common-protos==1.76.0 soundfile==0.14.0 cffi==2.0.0 pycparser==3.0
ls -l .whl
