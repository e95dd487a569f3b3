#!/usr/bin/env bash
# Fetch, into .whl/ (git-ignored), the wheels benchmarks/gpu.sh installs on the device machine
# (x86-64, CPython 3.12): the packages our code imports that its image lacks.
set -euo pipefail
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl pycocotools==2.0.11
du -sh .whl
