"""Accelerate set-up shared by the SFT loop: one code path for CPU, one GPU and many.

The number of processes, the backend (DDP, FSDP, DeepSpeed) and the devices come from how the
program was started (``accelerate launch --config_file configs/accelerate/<name>.yaml ...``, or
plain ``python``/``sigma`` for one process); the training config only sets what the recipe needs
(mixed precision, gradient accumulation). See docs/training.md.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sigmarec.errors import ConfigError
from sigmarec.training.config import TrainingConfig
from sigmarec.training.precision import label, resolve_precision

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("sigmarec")

# configs/accelerate/ of a source checkout (not shipped inside the wheel).
ACCELERATE_CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs" / "accelerate"
ACCELERATE_CONFIGS = ("cpu_single", "ddp", "fsdp", "deepspeed_zero2")


def accelerate_config(name: str) -> Path:
    """Path of a shipped accelerate config (``cpu_single``, ``ddp``, ``fsdp``, ...)."""
    path = ACCELERATE_CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no accelerate config {name!r} in {ACCELERATE_CONFIG_DIR}; "
                          f"shipped: {list(ACCELERATE_CONFIGS)}")
    return path


def make_accelerator(cfg: TrainingConfig, cpu: bool | None = None) -> Accelerator:
    """An ``Accelerator`` for ``cfg``; ``cpu=True`` forces the CPU even when a GPU is present.

    DDP is told not to broadcast buffers: the model's buffers are the frozen item features
    (megabytes) and constants, identical on every rank, so re-sending them before every forward
    would only cost bandwidth.

    ``cfg.mixed_precision`` is resolved against the hardware (``auto``: see
    :mod:`sigmarec.training.precision`); the request, the result and the reason are kept on the
    accelerator as ``sigmarec_precision`` (a dict) and reported by :func:`describe`.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedDataParallelKwargs, parse_flag_from_env

    use_cpu = (bool(cpu) or parse_flag_from_env("ACCELERATE_USE_CPU")  # as accelerate does
               or not (torch.cuda.is_available() or _has_other_accelerator()))
    if cfg.mixed_precision == "fp16" and use_cpu:
        raise ConfigError("training.mixed_precision fp16 needs a GPU; use auto, bf16 or no on CPU")
    precision, reason = resolve_precision(cfg.mixed_precision, _device_type(use_cpu))
    log.info("sft precision: %s — %s", label(precision), reason)
    # AcceleratorState is a process-wide singleton fixed by the first Accelerator. In a single
    # process (tests, notebooks, one pipeline running several trainings) a later run may ask for
    # another precision; start the state afresh then. Never inside a distributed launch.
    if AcceleratorState._shared_state and PartialState._shared_state:
        state = AcceleratorState()
        if state.num_processes == 1 and str(state.mixed_precision) != precision:
            AcceleratorState._reset_state(reset_partial_state=True)
    kwargs: dict[str, Any] = {}
    if cpu is not None:
        kwargs["cpu"] = cpu
    acc = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        **kwargs,
    )
    acc.sigmarec_precision = {"requested": cfg.mixed_precision, "resolved": precision,
                              "reason": reason}
    return acc


def _device_type(use_cpu: bool) -> str:
    if use_cpu:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "xpu"


def _has_other_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return bool((mps and mps.is_available()) or (xpu and xpu.is_available()))


def describe(accelerator: Accelerator) -> dict[str, Any]:
    """Facts about the run's processes, for the stage manifest."""
    resolved = str(accelerator.mixed_precision)
    chosen = getattr(accelerator, "sigmarec_precision", None) or {
        "requested": resolved, "reason": "set by the caller's Accelerator"}
    return {
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "num_processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "mixed_precision": resolved,
        "mixed_precision_requested": chosen["requested"],
        "mixed_precision_reason": chosen["reason"],
        "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
    }
