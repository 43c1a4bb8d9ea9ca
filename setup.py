"""Builds fastdiff._C from csrc/: C++ always, CUDA too when torch is a CUDA build and nvcc is
found (FASTDIFF_NO_CUDA=1 turns CUDA off). Install with `pip install -e . --no-build-isolation`."""

import fcntl
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch
from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
# -ffp-contract=off: no FMA contraction, so C++ kernels round like the PyTorch reference.
# -fno-math-errno (as PyTorch builds itself): sqrtf need not set errno, so loops calling it
# vectorise (csrc/step.cpp's noise); results are unchanged.
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
# No --use_fast_math: the in-kernel noise must match the PyTorch reference. The C++ standard is
# left to torch, which adds the -std its headers need (c++20 for torch 2.14).
NVCC_FLAGS = ["-O3"]


def find_cuda_home() -> str | None:
    """The real toolkit root. The `nvcc` on PATH may be a wrapper script, so ask nvcc itself:
    `--dryrun` prints `#$ TOP=<root>/bin/..` whatever symlink or script launched it. Without
    nvcc on PATH, the toolkit's usual place, /usr/local/cuda."""
    nvcc = shutil.which("nvcc") or shutil.which("nvcc", path="/usr/local/cuda/bin")
    if os.environ.get("CUDA_HOME") or nvcc is None:
        return os.environ.get("CUDA_HOME")
    cmd = [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    top = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(top.group(1) if top else Path(os.path.realpath(nvcc)).parent.parent)


CUDA_HOME = None if os.environ.get("FASTDIFF_NO_CUDA") == "1" else find_cuda_home()
WITH_CUDA = torch.version.cuda is not None and CUDA_HOME is not None
if WITH_CUDA:  # torch.utils.cpp_extension reads these when it is imported
    os.environ["CUDA_HOME"] = CUDA_HOME
    os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("TORCH_CUDA_ARCH_LIST") or "9.0"
os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
# torch runs the first `ninja` on PATH. Prefer this environment's: ninja versions disagree on the
# .ninja_log hashes, so alternating between two would recompile everything every time.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def write_build_config(path: Path, arch_list: list[str]) -> None:
    """The header build_info() reads; rewritten only when it changes (ninja tracks it)."""
    strings = lambda items: "{" + ", ".join(json.dumps(s) for s in items) + "}"
    text = (
        "// Written by setup.py; do not edit.\n#pragma once\n"
        f"#define FASTDIFF_WITH_CUDA {int(WITH_CUDA)}\n"
        f"#define FASTDIFF_CXX_FLAGS {strings(CXX_FLAGS)}\n"
        f"#define FASTDIFF_NVCC_FLAGS {strings(NVCC_FLAGS)}\n"
        f"#define FASTDIFF_CUDA_ARCH_LIST {strings(arch_list)}\n"
        f"#define FASTDIFF_TORCH_VERSION {json.dumps(torch.__version__)}\n"
    )
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


class BuildExt(BuildExtension):
    def finalize_options(self):
        # pip's editable builds get a fresh temp dir each time; keeping the objects in build/ lets
        # ninja recompile only the sources that changed.
        tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
        tag += "" if WITH_CUDA else "-nocuda"
        self.build_temp = self.build_temp or str(ROOT / "build" / f"temp.{tag}")
        super().finalize_options()

    def build_extensions(self):
        config = Path(self.build_temp).resolve() / "generated"
        config.mkdir(parents=True, exist_ok=True)
        # Builds started from several shells share build/: they take turns, and a later one
        # finds the objects up to date.
        with open(config / "build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(";", " ").split()
            write_build_config(config / "fastdiff_build_config.h", arch_list if WITH_CUDA else [])
            for ext in self.extensions:
                ext.include_dirs.insert(0, str(config))
            super().build_extensions()


def extension():
    sources = sorted(glob.glob("csrc/*.cpp", root_dir=ROOT))
    sources += sorted(glob.glob("csrc/*.cu", root_dir=ROOT)) if WITH_CUDA else []
    stems = [Path(s).stem for s in sources]  # foo.cpp and foo.cu would both compile to foo.o
    if len(set(stems)) < len(stems):
        raise SystemExit(f"csrc/: two sources share a name in {sources}; name CUDA files *_cuda.cu")
    ext = (CUDAExtension if WITH_CUDA else CppExtension)(
        "fastdiff._C",
        sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        extra_link_args=["-fopenmp"],  # links libgomp; at import it resolves to torch's copy
    )
    if WITH_CUDA:
        # The nvidia-* wheels next to torch hold headers torch's CUDA headers include (cuBLAS,
        # cuSPARSE, ...) that a bare toolkit may lack. Last, so the toolkit's own headers win.
        wheels = Path(torch.__file__).parent.parent / "nvidia"
        ext.include_dirs += sorted(glob.glob(str(wheels / "*" / "include")))
    return ext


setup(
    # kernels/ is the package fastdiff.kernels. setuptools' editable install (PEP 660) serves a
    # package_dir mapping like this one through an import hook it puts in site-packages, so
    # `import fastdiff.kernels` reads kernels/ in place (tests/test_build.py checks it).
    packages=find_packages(include=["fastdiff", "fastdiff.*"])
    + ["fastdiff.kernels"]
    + ["fastdiff.kernels." + p for p in find_packages("kernels")],
    package_dir={"fastdiff.kernels": "kernels"},
    package_data={"fastdiff": ["assets/*"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExt},
)
