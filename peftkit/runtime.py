"""What this process runs on: the device, the thread count, library versions and memory.

The one owner of these facts, so that training, serving, results and benchmarks record them the
same way. Imports nothing from peftkit.
"""

from __future__ import annotations

import ctypes
import gc
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


THREADS_ENV = "PEFTKIT_THREADS"  # the most torch threads a notebook's kernel may use (set by batch runs of several at once)


def thread_cap() -> int | None:
    """PEFTKIT_THREADS as a positive int, or None when unset. Two notebooks run side by side on a 2-core machine
    each get one thread: two one-thread processes train 1.3x more per second than one two-thread process on these
    small matrices, where two two-thread processes thrash."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{THREADS_ENV}={raw!r}: give a positive number of threads (e.g. 1), or unset it.")
    return int(raw)


def capped_threads(threads: int | None) -> int | None:
    """`threads` lowered to PEFTKIT_THREADS where that is set (None: the cap, or None without one)."""
    cap = thread_cap()
    return min(threads, cap) if threads and cap else threads or cap


def set_threads(threads: int | None) -> int:
    """torch.set_num_threads(threads), lowered to PEFTKIT_THREADS where that is set (None: the cap, or leave
    torch's count). Returns the count now in force."""
    want = capped_threads(threads)
    if want:
        torch.set_num_threads(want)
    return torch.get_num_threads()


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Without it torch
    emulates bf16 and autocast runs slower than fp32. (Tests monkeypatch this one function.)"""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(probe()) for probe in probes if probe is not None)


# The instruction sets that decide which inference precision is fastest, as /proc/cpuinfo names them.
CPU_FLAGS = {"AVX2": ("avx2",), "AVX-512": ("avx512f",), "VNNI": ("avx512_vnni", "avx_vnni"),
             "BF16": ("avx512_bf16", "amx_bf16"), "AMX": ("amx_int8", "amx_bf16", "amx_tile")}


def cpu_flags() -> dict[str, bool]:
    """Which of AVX2, AVX-512, VNNI (int8 dot products), BF16 (AVX512-BF16 or AMX-BF16) and AMX
    this CPU has: read from /proc/cpuinfo on Linux, else from torch's own probes."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return {name: any(f in have for f in names) for name, names in CPU_FLAGS.items()}
    except OSError:
        pass
    probe = {name: getattr(torch.cpu, f"_is_{name}_supported", lambda: False) for name in
             ("avx2", "avx512", "vnni", "avx512_bf16", "amx_tile")}
    return {"AVX2": bool(probe["avx2"]()), "AVX-512": bool(probe["avx512"]()), "VNNI": bool(probe["vnni"]()),
            "BF16": bool(probe["avx512_bf16"]() or probe["amx_tile"]()), "AMX": bool(probe["amx_tile"]())}


def cpu_family() -> str:
    """The CPU's family for a benchmark table: its maker and line, and its fastest relevant
    instructions, e.g. "Intel Xeon, AMX" or "AMD EPYC, AVX-512 with BF16"."""
    name, flags = cpu_name(), cpu_flags()
    maker = next((m for m in ("Intel Xeon", "Intel Core", "AMD EPYC", "AMD Ryzen", "Apple") if all(
        w.lower() in name.lower() for w in m.split())), name.split("@")[0].strip() or "unknown CPU")
    if flags["AMX"]:
        isa = "AMX"
    elif flags["AVX-512"]:
        isa = "AVX-512 with BF16" if flags["BF16"] else "AVX-512"
    else:
        isa = "AVX2" if flags["AVX2"] else "no AVX2"
    return f"{maker}, {isa}"


def cpu_summary() -> str:
    """One line for every benchmark output: the CPU model and which relevant flags it has."""
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu_flags().items())
    return f"{cpu_name()} ({flags})"


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


_HWM_RESET = False  # whether reset_peak_memory began a window here: /proc's VmHWM then holds its peak


def reset_peak_memory(device: str = "cpu") -> bool:
    """Begin a new peak window: from here `peak_memory_mib` reports the peak since this call, so runs one after
    another in one process (a notebook's) each get their own. CUDA: the allocator's peak statistics. CPU on Linux:
    the resident set's high-water mark, which writing 5 to /proc/self/clear_refs resets to the current resident
    set. Returns False where it cannot (another OS, a kernel that refuses): the peak is then the process's so far."""
    global _HWM_RESET
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return True
    gc.collect()  # an earlier run's model, if a reference cycle still holds it
    _trim_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    _HWM_RESET = True
    return True


def _trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim), so that memory an earlier run freed
    does not stay in the resident set the next run's peak starts from. A no-op elsewhere."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mib(device: str = "cpu") -> float:
    """Peak memory of this process since `reset_peak_memory` (else since it started): CUDA allocations, or the
    resident set on CPU."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    if _HWM_RESET and (hwm := _status_mib("VmHWM")) is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def current_rss_mib() -> float:
    """This process's resident memory now (Linux /proc; elsewhere the peak so far)."""
    rss = _status_mib("VmRSS")
    return peak_memory_mib("cpu") if rss is None else rss


def _status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM: in kB) in MiB; None where there is no such file."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
