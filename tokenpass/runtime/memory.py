"""Peak memory of a block of work: CUDA's allocator counters on a GPU, the kernel's high-water mark on CPU."""

from __future__ import annotations

import os
import threading

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def reset_high_water_mark() -> bool:
    """Reset the process's peak resident size (Linux ``clear_refs`` 5); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def high_water_mark_bytes() -> int:
    """Peak resident size since the last reset (``VmHWM``), 0 where the kernel does not report it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory:
    """``with PeakMemory() as m: ...`` then ``m.peak_bytes``: growth over the block's starting footprint.

    On CPU torch's allocator keeps no counters. On Linux the kernel's high-water mark is reset on entry
    and read on exit: exact, and free while the block runs. Elsewhere a thread samples resident memory
    every 2 ms (a lower bound, and the thread competes for the GIL, which slows timed work: bench
    figures from such a machine carry that cost).
    """

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.002):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = resident_bytes()
        self._max = self._start
        if not (reset_high_water_mark() and high_water_mark_bytes()):
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._max = max(self._max, resident_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        if self._thread is None:
            self._max = high_water_mark_bytes()
        else:
            self._stop.set()
            self._thread.join()
        self.peak_bytes = max(self._max, resident_bytes()) - self._start
