"""What this process runs on: the device, the thread count, library versions and memory.

The one owner of these facts, so that training, serving, results and benchmarks record them the
same way. Imports nothing from peftkit.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
from pathlib import Path

import torch
import transformers

from ._version import __version__


def resolve_device(device: str = "auto") -> torch.device:
    """"auto": CUDA (this rank's GPU under torchrun), then Apple's MPS, then the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Without it torch
    emulates bf16 and autocast runs slower than fp32."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(probe()) for probe in probes if probe is not None)


def cpu_name() -> str:
    """The CPU model as lscpu names it ("AMD EPYC", "Intel(R) Xeon(R) ..."), or the platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str | torch.device = "cpu") -> dict:
    """Device, threads and versions: recorded beside every measured figure."""
    return {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peftkit": __version__,
            "python": platform.python_version(), "machine": platform.machine()}


def peak_memory_mib(device: str = "cpu") -> float:
    """Peak memory of this process so far: CUDA allocations, or the resident set on CPU."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def current_rss_mib() -> float:
    """This process's resident memory now (Linux /proc; elsewhere the peak so far)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_memory_mib("cpu")
