"""How much memory a device has free, and sizes in words: what placement and batch sizes are
chosen from."""

from __future__ import annotations

import os
import resource

import torch


def available_memory(device: torch.device | str) -> int:
    """Bytes free: the GPU's free memory, or the system's MemAvailable (page cache counts as
    free: the kernel gives it back). `MERGESEARCH_DEVICE_MEMORY` (bytes) caps what this process may
    use of a GPU, as `torch.cuda.set_per_process_memory_fraction` does, which the free memory the
    driver reports does not show."""
    device = torch.device(device)
    if device.type == "cuda":
        free = int(torch.cuda.mem_get_info(device)[0])
        cap = os.environ.get("MERGESEARCH_DEVICE_MEMORY")
        if cap:
            free = min(free, int(float(cap)) - torch.cuda.memory_reserved(device))
        return max(0, free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30  # unknown (not Linux): assume a small machine


def rss() -> dict[str, int]:
    """This process's resident memory now, in bytes: all of it, the anonymous part (what the
    process allocated) and the file-backed part (pages of mapped files, which the kernel can drop)
    and the peak of all of it (VmHWM). Zeros where /proc is not there."""
    out = {"rss": 0, "anon": 0, "file": 0, "peak": 0}
    names = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file", "VmHWM:": "peak"}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key = names.get(line.split(":")[0] + ":")
                if key:
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        out["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"
