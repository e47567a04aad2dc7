"""Free memory on a device, as batch sizing and weight packing need it."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def free_bytes(device: torch.device | str) -> int:
    """Bytes that can still be allocated on ``device``: CUDA's free memory (plus what torch's allocator
    holds unused), else the host's available memory.

    On the host: ``MemAvailable`` of ``/proc/meminfo``, capped by a cgroup (v2) limit where one is
    set (a container's limit is what an allocation runs into); where neither is readable, the
    physical memory.
    """
    device = torch.device(device)
    if device.type == "cuda":  # the allocator's reserved but unused memory is free to it
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    available = _meminfo_available()
    limit = _cgroup_room()
    candidates = [v for v in (available, limit) if v is not None]
    if candidates:
        return min(candidates)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    """The cgroup v2 limit minus current use, or None where there is no limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
