#!/usr/bin/env bash
# Every GPU check fastdiff owes, for a lent H100/H200 (python3 there holds torch with CUDA; nothing
# can be fetched there, so the test-only packages travel as wheels in .whl/, made here by
# scripts/fetch_gpu_wheels.sh). Phases, each well inside a 10-minute call:
#
#   bash scripts/gpu_check.sh build test            # build fastdiff._C for sm_90, the whole suite
#   bash scripts/gpu_check.sh build sanitize kernels  # compute-sanitizer; step/attention/GN benches
#   bash scripts/gpu_check.sh build e2e             # unet + end-to-end sampling benchmarks
#
# `build` is skipped when fastdiff/_C*.so is newer than csrc/ and setup.py. Logs, JUnit XML and
# benchmark JSON/PNG go to $OUT (default out/gpu); a short summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
summary=()
note() { summary+=("$1"); echo "== $1"; }

if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

for phase in "$@"; do
    start=$SECONDS
    case $phase in
    build)
        so=$(ls fastdiff/_C*.so 2>/dev/null | head -1)
        if [ -n "$so" ] && [ -z "$(find csrc setup.py -newer "$so" 2>/dev/null)" ]; then
            note "build: up to date ($so)"
            continue
        fi
        $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1
        rc=$?
        info=$($PY -c "import fastdiff._C as C; print(C.build_info())" 2>&1)
        note "build: rc=$rc in $((SECONDS - start)) s; $info"
        ;;
    test)
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$OUT/gpu.txt"
        $PY -m pytest -n 8 --dist loadfile -q -p no:cacheprovider --junitxml="$OUT/junit.xml" \
            >"$OUT/test.log" 2>&1
        note "test: rc=$? in $((SECONDS - start)) s; $(tail -1 "$OUT/test.log")"
        ;;
    sanitize)
        for tool in memcheck racecheck; do
            compute-sanitizer --tool $tool --error-exitcode 1 \
                $PY scripts/sanitize_kernels.py >"$OUT/sanitize-$tool.log" 2>&1
            note "compute-sanitizer $tool: rc=$? in $((SECONDS - start)) s; $(tail -1 "$OUT/sanitize-$tool.log")"
        done
        ;;
    kernels | e2e)
        sections=(step attention group_norm)
        [ "$phase" = e2e ] && sections=(unet sampling)
        $PY benchmarks/run.py --device cuda --only "${sections[@]}" --out "$OUT" \
            >"$OUT/bench-$phase.log" 2>&1
        note "bench ${sections[*]}: rc=$? in $((SECONDS - start)) s"
        grep -E '^\|' "$OUT/bench-$phase.log" | head -60
        ;;
    *)
        echo "unknown phase $phase (build, test, sanitize, kernels, e2e)" >&2
        exit 2
        ;;
    esac
done
printf '%s\n' "${summary[@]}"
