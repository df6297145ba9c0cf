"""The precision a run computes in, chosen from the hardware when asked (`precision=auto`).

bf16 mixed precision (Micikevicius et al., 2018, "Mixed Precision Training", with bf16 instead of
fp16 and so no loss scaling) is 4-6x faster than fp32 on a CPU with AMX and about 4x on one with
AVX512-BF16, but 20x slower on a CPU with only AVX2, where every bf16 matmul is emulated. So
`precision=auto` picks bf16 only where the hardware runs it natively:

- on a CUDA GPU: `torch.cuda.is_bf16_supported()` (Ampere and newer);
- on a CPU: the `avx512_bf16` or `amx_bf16` flags (`/proc/cpuinfo`, else torch's cpuinfo), and a
  few-millisecond probe that times a bf16 against an fp32 matmul. The probe has the last word when
  the two disagree: a CPU that reports the flags but whose math library may not use them
  (`ONEDNN_MAX_CPU_ISA=AVX2`) runs fp32, and one without the x86 flags whose bf16 matmul is no
  slower (an Arm core with BF16) runs bf16.

`resolve_precision` returns the choice and a sentence that says why; an explicit `precision=bf16`
on hardware without native bf16 runs as asked, with one warning line.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import ConfigError

log = logging.getLogger(__name__)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CHOICES = (*PRECISIONS, "auto")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo's names for native bf16 on x86
PROBE_SIZE = 256  # n of the probe's n x n matmuls: 0.2 ms in fp32, ~15 ms in emulated bf16
SLOW = 1.5  # a probe ratio (bf16 time / fp32 time) above this means bf16 is not native


@dataclass(frozen=True)
class Bf16Support:
    """Whether this device runs bf16 natively, why, and (CPUs) the probe's bf16 / fp32 time."""

    native: bool
    reason: str
    slowdown: float | None = None  # bf16 matmul time over fp32's, PROBE_SIZE x PROBE_SIZE


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU's bf16-related feature flags: from /proc/cpuinfo where it exists (Linux), else from
    torch's cpuinfo (macOS, Windows); None where neither can tell."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = None
    if text is not None:
        line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
        return set(line.partition(":")[2].split())
    try:
        found = {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
                 "amx_bf16": torch.cpu._is_amx_tile_supported(),
                 "avx2": torch.cpu._is_avx2_supported()}
    except AttributeError:  # another torch: nothing to ask
        return None
    return {name for name, present in found.items() if present}


def probe_slowdown(device: torch.device, n: int = PROBE_SIZE, rounds: int = 3) -> float:
    """How many times longer a bf16 n x n matmul takes than an fp32 one: the two timed in turn,
    `rounds` times after a warm-up each, the best time of each kept (a busy machine slows a
    round, never speeds one up)."""
    x = {dtype: torch.randn(n, n, device=device).to(dtype)
         for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(x, float("inf"))
    for dtype, a in x.items():
        torch.mm(a, a)  # warm-up: the kernel's lazy init, the thread pool
    for _ in range(rounds):
        for dtype, a in x.items():
            t0 = time.perf_counter()
            torch.mm(a, a)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best[dtype] = min(best[dtype], time.perf_counter() - t0)
    return best[torch.bfloat16] / max(best[torch.float32], 1e-9)


def cpu_bf16_support(flags: set[str] | None, slowdown: float) -> Bf16Support:
    """The CPU rule: native flags and a probe that agrees; or, without the flags, a probe that
    finds bf16 no slower than fp32."""
    have = [f for f in BF16_FLAGS if flags and f in flags]
    speed = (f"a bf16 matmul ran {slowdown:.1f}x as long as fp32's" if slowdown >= 1
             else f"a bf16 matmul ran {1 / slowdown:.1f}x faster than fp32's")
    if have and slowdown <= SLOW:
        return Bf16Support(True, f"this CPU has native bf16 ({', '.join(have)}; {speed})",
                           slowdown)
    if have:
        return Bf16Support(False, f"this CPU reports {', '.join(have)}, but {speed}: its math "
                           "library does not use them here (ONEDNN_MAX_CPU_ISA?)", slowdown)
    if slowdown <= 1.0:
        return Bf16Support(True, f"no x86 bf16 flags, but {speed}", slowdown)
    isa = "AVX2" if flags and "avx2" in flags else "no AVX512-BF16 or AMX"
    return Bf16Support(False, f"this CPU has no native bf16 ({isa}); {speed}, and a training "
                       "step in bf16 is about 20x slower", slowdown)


@functools.lru_cache(maxsize=None)
def bf16_support(device: torch.device) -> Bf16Support:
    """Whether `device` runs bf16 natively (cached: the probe runs once per process)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Bf16Support(True, f"the GPU ({name}) supports bf16")
        return Bf16Support(False, f"the GPU ({name}) has no native bf16 (before Ampere)")
    if device.type != "cpu":
        return Bf16Support(False, f"no bf16 rule for device type {device.type!r}")
    return cpu_bf16_support(cpu_flags(), probe_slowdown(device))


def machine_class(device: torch.device | str = "cpu") -> str:
    """The kind of machine a benchmark's numbers and targets apply to, in a few words: 'CPU with
    native bf16 (amx_bf16)', 'CPU without native bf16 (AVX2)', 'GPU NVIDIA H200 (bf16)'."""
    device = torch.device(device)
    support = bf16_support(device)
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)} ({'bf16' if support.native else 'no bf16'})"
    flags = cpu_flags() or set()
    have = [f for f in BF16_FLAGS if f in flags]
    if support.native:
        return f"CPU with native bf16 ({', '.join(have) or 'probed'})"
    isa = torch.backends.cpu.get_cpu_capability()  # what torch's kernels use: AVX512, AVX2, ...
    return f"CPU without native bf16 ({isa}{', bf16 flags unused' if have else ''})"


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in CHOICES:
        raise ConfigError(f"precision={precision!r}; use one of {list(CHOICES)}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision=fp16 needs a GPU (it trains with a gradient scaler on "
                          "CUDA); on the CPU use precision=bf16 or auto")


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """(the precision to compute in, why): `auto` resolved from the hardware; an explicit bf16 on
    hardware without native bf16 kept, with a warning."""
    check_precision(requested, device)
    if requested == "auto":
        support = bf16_support(device)
        chosen = "bf16" if support.native else "fp32"
        return chosen, f"precision=auto -> {chosen}: {support.reason}"
    if requested == "bf16":
        support = bf16_support(device)
        if not support.native:
            log.warning("precision=bf16 on hardware without native bf16: %s. It runs as asked; "
                        "precision=fp32 (or auto) is faster here", support.reason)
            return "bf16", f"precision=bf16, as asked, though {support.reason}"
    return requested, f"precision={requested}, as asked"


def run_precision(requested: str, device: torch.device, record: dict | None) -> tuple[str, str]:
    """`resolve_precision`, except that a resumed run (`record`: its run.json) keeps the precision
    it started in, saying so where this machine would choose another."""
    chosen, why = resolve_precision(requested, device)
    saved = (record or {}).get("precision")
    if saved and saved["chosen"] != chosen:
        log.warning("this run started in %s (%s); on this machine %s. It continues in %s, as it "
                    "started (a run does not switch precision midway)", saved["chosen"],
                    saved["why"], why, saved["chosen"])
        return saved["chosen"], f"{saved['why']} (kept on resume; here {why})"
    return chosen, why
