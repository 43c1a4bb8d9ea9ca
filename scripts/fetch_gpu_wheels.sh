#!/usr/bin/env bash
# Download the pure-Python wheels the test suite needs that the GPU machines lack (they reach no
# package index) into .whl/, kept out of git by .git/info/exclude. scripts/gpu_check.sh installs
# them there. Python 3.12 is the GPU machines' interpreter. With --stable-fast, also stable-fast's
# source package (it has no wheel; scripts/gpu_check.sh stable-fast builds it there).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
# one version of each (two stop the install there): the folder is made afresh, the versions pinned
# to those the tests run with here
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 pytorch-fid==0.3.0 \
    clean-fid==0.1.35
if [ "${1:-}" = --stable-fast ]; then
    # pip download would build its metadata, which imports torch: fetch the file PyPI names
    python3 - <<'PY'
import hashlib, json, urllib.request
meta = json.load(urllib.request.urlopen("https://pypi.org/pypi/stable-fast/json"))
(sdist,) = [u for u in meta["releases"]["1.0.5"] if u["packagetype"] == "sdist"]
data = urllib.request.urlopen(sdist["url"]).read()
if hashlib.sha256(data).hexdigest() != sdist["digests"]["sha256"]:
    raise SystemExit(f"{sdist['filename']}: sha256 differs from PyPI's")
open(f".whl/{sdist['filename']}", "wb").write(data)
PY
fi
ls -l .whl
