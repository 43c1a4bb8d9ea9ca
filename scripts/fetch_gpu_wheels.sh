#!/usr/bin/env bash
# Download the pure-Python wheels the test suite needs that the GPU machines lack (they reach no
# package index) into .whl/, kept out of git by .git/info/exclude. scripts/gpu_check.sh installs
# them there. Python 3.12 is the GPU machines' interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform any -d .whl \
    diffusers==0.42.1 importlib_metadata lazy-importer pytorch-fid clean-fid
ls -l .whl
