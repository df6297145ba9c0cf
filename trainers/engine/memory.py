"""Memory accounting for every run, whatever the PEFT method: the footprint the memory-efficient
methods (GaLore, Zhao et al., 2024; GradNormLoRP, Huang et al., 2025; 8-bit states, Dettmers et
al., 2022) are chosen by. Counted exactly from the tensors:

    memory/param_bytes             parameters and buffers of the model (base, adapters, heads)
    memory/trainable_param_bytes   the trainable parameters
    memory/grad_bytes              one gradient per trainable parameter, as backward allocates
    memory/optimizer_state_bytes   every tensor in the optimizer's state (minbert.optim)

and measured: `memory/peak_bytes` is CUDA's max allocated during training on a GPU, and on the CPU
the growth of the process's peak RSS during training (sampled every 5 ms, and the kernel's
high-water mark, reset when training starts where Linux allows it).
"""
from __future__ import annotations

import contextlib
import resource
import threading
from pathlib import Path

import torch
from torch import nn

from minbert.optim import optimizer_state_bytes

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")
_STATM, _PAGE = Path("/proc/self/statm"), resource.getpagesize()


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_metrics(model: nn.Module, optimizer=None, peak_bytes: int = 0) -> dict[str, int]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "memory/param_bytes": _bytes(model.parameters()) + _bytes(model.buffers()),
        "memory/trainable_param_bytes": _bytes(trainable),
        "memory/grad_bytes": _bytes(trainable),
        "memory/optimizer_state_bytes": optimizer_state_bytes(optimizer) if optimizer else 0,
        "memory/peak_bytes": int(peak_bytes),
    }


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """`with PeakMemory(device) as peak: train()`, then `peak.bytes`.

    On the CPU a background thread samples the resident set every `interval` seconds, and the
    kernel's high-water mark (reset on entry) is read on exit; the larger growth over the RSS at
    entry counts. Sampling is needed because Linux updates VmHWM lazily and can miss a peak that
    is unmapped before it is read; the high-water mark catches peaks between samples."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.cuda = torch.device(device).type == "cuda"
        self.device, self.interval, self.start, self.bytes = device, interval, 0, 0
        self._max_rss, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._max_rss = max(self._max_rss, _rss_bytes())

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        with contextlib.suppress(OSError):  # without it, VmHWM is the process's lifetime peak
            _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        self.start = self._max_rss = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.bytes = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        self._thread.join()
        peak_kb = _status_kb("VmHWM")
        if peak_kb is None:  # no /proc: ru_maxrss is the process's lifetime peak, in KiB on Linux
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = max(self._max_rss, _rss_bytes(), peak_kb * 1024)
        self.bytes = max(0, peak - self.start)


def _rss_bytes() -> int:
    """The current resident set size (/proc/self/statm; 0 where there is no /proc)."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0
