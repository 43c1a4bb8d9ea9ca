#!/usr/bin/env bash
# Every GPU check fastdiff owes, for a lent H100/H200, in one call of the device tool (python3
# there holds torch with CUDA; nothing can be fetched there, so the test-only packages travel as
# wheels in .whl/, made here by scripts/fetch_gpu_wheels.sh):
#
#   bash scripts/gpu_check.sh all              # = build test sanitize kernels e2e, in that order
#   bash scripts/gpu_check.sh build e2e        # or any phases, in the order given
#
#   build     pip install -e . (fastdiff._C for sm_90 against that machine's torch; the editable
#             install is also what makes kernels/ importable as fastdiff.kernels)
#   test      the whole suite with compiled Triton and CUDA kernels (JUnit XML), but for the
#             CUDA kernels' host emulation (tests/test_cuda_emulation.py, a CPU-side check)
#   sanitize  compute-sanitizer memcheck and racecheck over scripts/sanitize_kernels.py
#   kernels   benchmarks/run.py --only step attention group_norm
#   e2e       benchmarks/run.py --only unet sampling
#
# The phases share one deadline, DEADLINE seconds after the start (default 540, inside the
# tool's 600 s limit): each runs under `timeout` until then, capped at its own share, and a
# phase that would start with under 30 s left is skipped and named in the summary. BENCH_ARGS
# (default --quick: full shapes, short timings) goes to benchmarks/run.py. Everything lands in
# $OUT (default out/gpu) as two files, since the tool returns at most eight: summary.txt and
# gpu-check.tar.gz (logs, JUnit XML, benchmark JSON and PNGs, nvidia-smi, versions).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
DEADLINE=${DEADLINE:-540}
BENCH_ARGS=${BENCH_ARGS:---quick}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
summary=()
note() { summary+=("$1"); echo "== $1"; }

finish() {
    printf '%s\n' "${summary[@]}" | tee "$WORK/summary.txt" >"$OUT/summary.txt"
    tar -czf "$OUT/gpu-check.tar.gz" -C "$WORK" . 2>/dev/null
}
trap finish EXIT

# "N passed, F failed, E errors, S skipped" from pytest's JUnit XML (complete after a SIGINT too)
junit_counts() {
    $PY -c 'import sys, xml.etree.ElementTree as ET
s = ET.parse(sys.argv[1]).getroot()
s = s if s.tag == "testsuite" else s.find("testsuite")
n, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
print(f"{n - f - e - k} passed, {f} failed, {e} errors, {k} skipped")' "$1" 2>/dev/null ||
        echo "no JUnit XML"
}

# a phase's time: at most its share, never past the deadline; 0 when under 30 s are left
budget() {
    local left=$((DEADLINE - SECONDS))
    ((left < 30)) && { echo 0; return; }
    ((left < $1)) && echo "$left" || echo "$1"
}

phases=("$@")
[ "${phases[*]}" = all ] && phases=(build test sanitize kernels e2e)
for phase in "${phases[@]}"; do
    case $phase in build | test | sanitize | kernels | e2e) ;; *)
        echo "unknown phase $phase (build, test, sanitize, kernels, e2e, or all)" >&2
        exit 2
        ;;
    esac
done

if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >"$WORK/wheels.log" 2>&1 || note "wheels: install failed"
    export PYTHONPATH=/tmp/site
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    git rev-parse HEAD 2>/dev/null
    git status --short 2>/dev/null | head -20
} >"$WORK/env.txt" 2>&1

for phase in "${phases[@]}"; do
    start=$SECONDS
    case $phase in
    build) t=$(budget 300) ;;
    test) t=$(budget 270) ;;
    sanitize) t=$(budget 120) ;;
    kernels) t=$(budget 180) ;;
    e2e) t=$(budget 600) ;;
    esac
    if [ "$t" = 0 ]; then
        note "$phase: not run (deadline $DEADLINE s reached)"
        continue
    fi
    case $phase in
    build)
        timeout "$t" $PY -m pip install --no-build-isolation --no-deps --no-index -e . \
            >"$WORK/build.log" 2>&1
        rc=$?
        info=$($PY -c "import fastdiff._ext as e, fastdiff.kernels; print(e.build_info())" 2>&1 | tail -1)
        note "build: rc=$rc in $((SECONDS - start)) s; $info"
        ;;
    test)
        # SIGINT at the deadline: pytest stops, still reports what ran and writes the XML. The
        # host emulation of the CUDA kernels is left to CPU machines: here the real ones run.
        timeout -s INT -k 20 "$t" $PY -m pytest -n 12 --dist loadfile -q -p no:cacheprovider \
            --ignore=tests/test_cuda_emulation.py \
            --junitxml="$WORK/junit.xml" >"$WORK/test.log" 2>&1
        rc=$?
        note "test: rc=$rc in $((SECONDS - start)) s; $(junit_counts "$WORK/junit.xml")"
        ;;
    sanitize)
        for tool in memcheck racecheck; do
            timeout "$((t / 2))" compute-sanitizer --tool $tool --error-exitcode 1 \
                $PY scripts/sanitize_kernels.py >"$WORK/sanitize-$tool.log" 2>&1
            note "compute-sanitizer $tool: rc=$? in $((SECONDS - start)) s; $(tail -1 "$WORK/sanitize-$tool.log")"
        done
        ;;
    kernels | e2e)
        sections=(step attention group_norm)
        [ "$phase" = e2e ] && sections=(unet sampling)
        # shellcheck disable=SC2086
        timeout "$t" $PY benchmarks/run.py --device cuda --only "${sections[@]}" $BENCH_ARGS \
            --out "$WORK/bench" >"$WORK/bench-$phase.log" 2>&1
        note "bench ${sections[*]}: rc=$? in $((SECONDS - start)) s"
        grep -E '^\|' "$WORK/bench-$phase.log" | head -80
        ;;
    esac
done
