#!/usr/bin/env bash
# Every GPU check fastdiff owes, for a lent H100/H200, in one call of the device tool (python3
# there holds torch with CUDA; nothing can be fetched there, so the test-only packages travel as
# wheels in .whl/, made here by scripts/fetch_gpu_wheels.sh; the tree travels without .git, so
# FASTDIFF_COMMIT names its commit for the benchmark JSON):
#
#   FASTDIFF_COMMIT=<sha> bash scripts/gpu_check.sh all   # = build sanitize step test kernels
#                                                         #   test-rest e2e, in that order
#   bash scripts/gpu_check.sh build e2e                   # or any phases, in the order given
#
#   build      pip install -e . (fastdiff._C for sm_90 against that machine's torch; the editable
#              install is also what makes kernels/ importable as fastdiff.kernels); fails loudly
#              if the extension came out without CUDA
#   sanitize   compute-sanitizer memcheck (every part of scripts/sanitize_kernels.py) and
#              racecheck (the kernels with shared memory), on fastdiff's kernels only
#   step       benchmarks/run.py --only step (the fused step: the figures issue 3 asks for)
#   test       the test modules marked `gpu` (pytest -m gpu): those whose kernels run on the GPU
#   kernels    benchmarks/run.py --only attention group_norm
#   test-rest  the other test modules (-m "not gpu", CPU-side code that CI runs too), but for
#              the CUDA kernels' host emulation (tests/test_cuda_emulation.py, a CPU-side check)
#   e2e        benchmarks/run.py --only unet sampling
#   stable-fast  not in `all`: builds stable-fast from the source package in .whl/
#              (scripts/fetch_gpu_wheels.sh --stable-fast) into the wheels' site, so that a
#              later e2e also times diffusers+stable-fast: `... gpu_check.sh stable-fast e2e`
#
# The phases share one deadline, DEADLINE seconds after the start (default 540, inside the
# tool's 600 s limit): each runs under `timeout` until then, capped at its own share, and a
# phase that would start with under 30 s left is skipped and named in the summary; the order
# puts what only a GPU can check first. BENCH_ARGS (default --quick: full shapes, short timings)
# goes to benchmarks/run.py, which writes its JSON after every case, so a phase cut short keeps
# what it measured. Everything lands in $OUT (default out/gpu) as two files, since the tool
# returns at most eight: summary.txt and gpu-check.tar.gz (logs, JUnit XML, benchmark JSON and
# PNGs, nvidia-smi, versions).
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
    rm -rf "$WORK"
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

ALL=(build sanitize step test kernels test-rest e2e)
phases=("$@")
[ "${phases[*]}" = all ] && phases=("${ALL[@]}")
for phase in "${phases[@]}"; do
    case " ${ALL[*]} stable-fast " in *" $phase "*) ;; *)
        echo "unknown phase $phase (${ALL[*]}, stable-fast, or all)" >&2
        exit 2
        ;;
    esac
done

if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >"$WORK/wheels.log" 2>&1 || note "wheels: install failed"
    export PYTHONPATH=/tmp/site
fi
commit=$(git rev-parse HEAD 2>/dev/null) || commit=${FASTDIFF_COMMIT:-}
note "commit ${commit:-unknown (no git here and no FASTDIFF_COMMIT: the benchmark JSON will name none)}"
[ -n "$commit" ] && export FASTDIFF_COMMIT=$commit
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    echo "kernel $(uname -r) (4.4.0: gVisor, where compute-sanitizer is refused)"
    nvcc --version | tail -2
    compute-sanitizer --version | tail -1
    git status --short 2>/dev/null | head -20
} >"$WORK/env.txt" 2>&1

# compute-sanitizer's options that older releases lack, asked of the one installed
sanitizer_options() {
    local help
    help=$(compute-sanitizer --help 2>&1)
    SANITIZER=(--error-exitcode 1)
    # only fastdiff's kernels (all in namespace fastdiff): torch's own go uninstrumented
    if grep -q -- "--kernel-name " <<<"$help"; then
        SANITIZER+=(--kernel-name kns=fastdiff)
    elif grep -q -- "--kernel-regex " <<<"$help"; then
        SANITIZER+=(--kernel-regex kns=fastdiff)
    fi
    # errors that CUDA API calls return by design (torch probing at start-up) are not the kernels'
    grep -q -- "--report-api-errors" <<<"$help" && SANITIZER+=(--report-api-errors no)
}

pytest_phase() { # name, marker expression, budget
    # SIGINT at the deadline: pytest stops, still reports what ran and writes the XML; --dist load
    # spreads one module's tests over the workers (test_step_kernels alone is a third of them)
    timeout -s INT -k 20 "$3" $PY -m pytest -n 12 --dist load -q -p no:cacheprovider \
        -m "$2" --ignore=tests/test_cuda_emulation.py \
        --junitxml="$WORK/junit-$1.xml" >"$WORK/$1.log" 2>&1
    local rc=$?
    note "$1: rc=$rc in $((SECONDS - start)) s; $(junit_counts "$WORK/junit-$1.xml")"
}

bench_phase() { # name, sections...
    local name=$1
    shift
    # shellcheck disable=SC2086
    timeout "$t" $PY benchmarks/run.py --device cuda --only "$@" $BENCH_ARGS \
        --out "$WORK/bench" >"$WORK/bench-$name.log" 2>&1
    note "bench $*: rc=$? in $((SECONDS - start)) s"
    grep -E '^\|' "$WORK/bench-$name.log" | head -80
}

for phase in "${phases[@]}"; do
    start=$SECONDS
    case $phase in
    build) t=$(budget 240) ;;
    sanitize) t=$(budget 110) ;;
    step) t=$(budget 100) ;;
    test) t=$(budget 200) ;;
    kernels) t=$(budget 120) ;;
    test-rest) t=$(budget 150) ;;
    e2e) t=$(budget 600) ;;
    stable-fast) t=$(budget 300) ;;
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
        grep -q "'cuda': True" <<<"$info" ||
            note "build: WARNING: fastdiff._C has no CUDA kernels (nvcc not found?): every cuda check below is refused"
        ;;
    sanitize)
        sanitizer_options
        # no caching allocator: a write past a tensor's end would land in its block's slack
        export PYTORCH_NO_CUDA_MEMORY_CACHING=1
        for tool in memcheck racecheck; do
            parts=()
            share=$((t * 2 / 3))
            [ $tool = racecheck ] && parts=(--only group_norm tiles noise) share=$((t - (SECONDS - start)))
            ((share < 10)) && share=10
            timeout "$share" compute-sanitizer --tool $tool "${SANITIZER[@]}" \
                $PY scripts/sanitize_kernels.py "${parts[@]}" >"$WORK/sanitize-$tool.log" 2>&1
            note "compute-sanitizer $tool: rc=$? in $((SECONDS - start)) s; $(grep -E 'done|all equal|ERROR SUMMARY|Error' "$WORK/sanitize-$tool.log" | tail -3 | tr '\n' ' ')"
        done
        unset PYTORCH_NO_CUDA_MEMORY_CACHING
        ;;
    step) bench_phase step step ;;
    test) pytest_phase test gpu "$t" ;;
    kernels) bench_phase kernels attention group_norm ;;
    test-rest) pytest_phase test-rest "not gpu" "$t" ;;
    e2e) bench_phase e2e unet sampling ;;
    stable-fast)
        sdist=$(compgen -G ".whl/stable-fast-*.tar.gz" | head -1)
        if [ -z "$sdist" ]; then
            note "stable-fast: no source package in .whl/ (scripts/fetch_gpu_wheels.sh --stable-fast)"
            continue
        fi
        # its build imports torch (no isolation); cuDNN's headers: torch's nvidia-cudnn wheel, a
        # namespace package, which stable-fast's own lookup (cudnn.__file__) misses
        [ -n "${CUDNN_HOME:-}" ] || CUDNN_HOME=$($PY -c "import nvidia.cudnn as c, os
d = next((p for p in c.__path__ if os.path.exists(p + '/include/cudnn.h')), '')
print(d)" 2>/dev/null)
        [ -n "$CUDNN_HOME" ] && export CUDNN_HOME
        # torch's CUDA headers include cuBLAS's: where the toolkit lacks them, the nvidia-* wheels'
        # include folders, searched after every -I
        nv=$($PY -c "import nvidia, glob
print(':'.join(sorted(d for p in nvidia.__path__ for d in glob.glob(p + '/*/include'))))" 2>/dev/null)
        [ -n "$nv" ] && export CPATH=${CPATH:+$CPATH:}$nv
        sf_install() { # within the phase's share; fails when under 30 s of it are left
            local left=$((t - (SECONDS - start)))
            ((left >= 30)) || return 124
            timeout "$left" $PY -m pip install --no-build-isolation --no-deps --no-index \
                --no-cache-dir --target /tmp/site "$sdist" >>"$WORK/stable-fast.log" 2>&1
        }
        # its CUDA ops (cuBLAS, cuDNN, CUTLASS) use ATen internals that torch 2.14 no longer has
        # (seen on the CPU machine): then its TorchScript, CUDA-graph and Triton parts alone
        sf_install || { echo "== WITH_CUDA=0" >>"$WORK/stable-fast.log"; WITH_CUDA=0 sf_install; }
        rc=$?
        export PYTHONPATH=/tmp/site
        note "stable-fast: rc=$rc in $((SECONDS - start)) s; $(cd benchmarks && $PY -c "import report; print('stable-fast', report.stable_fast_version())" 2>&1 | tail -1)"
        ;;
    esac
done
