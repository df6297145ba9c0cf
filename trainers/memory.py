"""Memory accounting for every run, whatever the PEFT method: the footprint the memory-efficient
methods (GaLore, Zhao et al., 2024; GradNormLoRP, Huang et al., 2025; 8-bit states, Dettmers et
al., 2022) are chosen by. Counted exactly from the tensors:

    memory/param_bytes             parameters and buffers of the model (base, adapters, heads)
    memory/trainable_param_bytes   the trainable parameters
    memory/grad_bytes              one gradient per trainable parameter, as backward allocates
    memory/optimizer_state_bytes   every tensor in the optimizer's state (minbert.optim)

and measured: `memory/peak_bytes` is CUDA's max allocated during training on a GPU, and on the CPU
the growth of the process's peak RSS during training (the kernel's high-water mark is reset when
training starts, where Linux allows it).
"""
from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import torch
from torch import nn

from minbert.optim import optimizer_state_bytes

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


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
    """`with PeakMemory(device) as peak: train()`, then `peak.bytes`."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.device, self.start, self.bytes = device, 0, 0

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        with contextlib.suppress(OSError):  # without it, VmHWM is the process's lifetime peak
            _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        self.start = (_status_kb("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.bytes = torch.cuda.max_memory_allocated(self.device)
            return
        peak_kb = _status_kb("VmHWM")
        if peak_kb is None:  # no /proc: ru_maxrss is the process's lifetime peak, in KiB on Linux
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.bytes = max(0, peak_kb * 1024 - self.start)
