"""Which autocast precision the SFT loop uses: ``training.mixed_precision`` against the hardware.

``auto`` (the default) picks bf16 where the hardware computes it natively (a CUDA GPU that
supports bf16; a CPU with the ``avx512_bf16`` or ``amx_bf16`` instructions) and fp32 (``no``)
elsewhere: on a CPU without them bf16 autocast is emulated and about 25x slower than fp32. An
explicit ``bf16``/``fp16``/``no`` is honoured (with a warning where it will be slow).
:func:`resolve_precision` is pure given :class:`HardwareCaps`; :func:`detect_caps` reads them.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("sigmarec")

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass(frozen=True)
class HardwareCaps:
    """What the precision choice depends on."""

    cuda_available: bool = False
    cuda_bf16: bool = False  # torch.cuda.is_bf16_supported()
    cpu_flags: frozenset[str] = field(default_factory=frozenset)  # /proc/cpuinfo, bf16 ones only

    @property
    def cpu_bf16(self) -> bool:
        return any(f in self.cpu_flags for f in CPU_BF16_FLAGS)


def detect_caps() -> HardwareCaps:
    """The capabilities of this machine (CPU flags from /proc/cpuinfo on Linux, none elsewhere)."""
    import torch

    cuda = bool(torch.cuda.is_available())
    cuda_bf16 = False
    if cuda:
        try:
            cuda_bf16 = bool(torch.cuda.is_bf16_supported())
        except (RuntimeError, AssertionError):
            cuda_bf16 = False
    flags = _cpu_flags()
    # torch dispatches its CPU kernels by its own capability level, which ATEN_CPU_CAPABILITY
    # can lower: below AVX512 the bf16 kernels are emulated whatever the CPU offers.
    level = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "")()
    if flags and str(level).upper() not in ("AVX512", "AVX512_BF16", "AMX", ""):
        flags = frozenset()
    # oneDNN (the matmuls under autocast) has its own cap; below the BF16 ISAs it emulates too.
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if flags and isa and not any(k in isa for k in ("BF16", "AMX", "ALL", "AVX10")):
        flags = frozenset()
    return HardwareCaps(cuda_available=cuda, cuda_bf16=cuda_bf16, cpu_flags=flags)


def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    if not sys.platform.startswith("linux"):
        return frozenset()
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":  # the first processor's; all cores share one instruction set
            return frozenset(f for f in value.split() if f in CPU_BF16_FLAGS)
    return frozenset()


def resolve_precision(requested: str, device_type: str,
                      caps: HardwareCaps | None = None) -> tuple[str, str]:
    """``(precision, reason)``: the value for ``Accelerator(mixed_precision=...)`` and why.

    ``device_type`` is the torch device type training runs on (``cpu``, ``cuda``, ``mps``,
    ``xpu``). ``caps=None`` detects them. Never fails: fp16 on a CPU is rejected by the caller.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {PRECISIONS}, not {requested!r}")
    caps = caps if caps is not None else detect_caps()
    cpu_native = ", ".join(f for f in CPU_BF16_FLAGS if f in caps.cpu_flags)
    if requested == "no":
        return "no", "requested (mixed_precision: no)"
    if requested == "fp16":
        return "fp16", "requested (mixed_precision: fp16)"
    if requested == "bf16":
        if device_type == "cpu" and not caps.cpu_bf16:
            log.warning("training.mixed_precision bf16 on a CPU without avx512_bf16/amx_bf16: "
                        "bf16 autocast is emulated there and about 25x slower than fp32; use "
                        "mixed_precision: auto or no")
            return "bf16", "requested (mixed_precision: bf16); emulated on this CPU (slow)"
        if device_type == "cuda" and not caps.cuda_bf16:
            log.warning("training.mixed_precision bf16 on a CUDA device without bf16 support; "
                        "use mixed_precision: auto, no or fp16")
        return "bf16", "requested (mixed_precision: bf16)"
    # auto
    if device_type == "cuda":
        if caps.cuda_bf16:
            return "bf16", "CUDA device with bf16 support"
        return "no", "CUDA device without bf16 support (set fp16 explicitly to use it)"
    if device_type == "cpu":
        if caps.cpu_bf16:
            return "bf16", f"CPU with native bf16 ({cpu_native})"
        return "no", "CPU without avx512_bf16/amx_bf16: bf16 autocast would be emulated"
    return "no", f"{device_type} device: bf16 autocast not verified there, fp32 is the safe choice"


def label(precision: str) -> str:
    """``no`` reads as ``no (fp32)`` in logs."""
    return "no (fp32)" if precision == "no" else precision
