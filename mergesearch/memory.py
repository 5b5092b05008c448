"""How much memory a device has free, and sizes in words: what placement and batch sizes are
chosen from."""

from __future__ import annotations

import resource

import torch


def available_memory(device: torch.device | str) -> int:
    """Bytes free: the GPU's free memory, or the system's MemAvailable (page cache counts as
    free: the kernel gives it back)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
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
