"""The tensor-core CUDA kernels (csrc/cuda/*_tc.cu) built as host C++ and run under the emulator of
tests/cuda_emu, against plain float64 loops and the CPU kernels: their indexing, tiling, barriers,
warp collectives, cp.async ordering and bounds are checked on any machine, GPU or not (a GPU run
still has to confirm the hardware: see benchmarks/device_check.sh).

Runs a representative subset (`tests/cuda_emu/run.sh quick`); `tests/cuda_emu/run.sh` runs all.
"""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++17)")
def test_tensor_core_kernels_under_the_emulator():
    run = subprocess.run(["bash", str(ROOT / "tests" / "cuda_emu" / "run.sh"), "quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=1500)
    tail = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0, tail
    assert " 0 failed" in run.stdout, tail
