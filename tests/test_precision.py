"""training.mixed_precision: auto vs the hardware, the accelerator report, the budget check."""

from __future__ import annotations

import logging

import pytest

from sigmarec.errors import ConfigError
from sigmarec.training import TrainingConfig, describe, make_accelerator
from sigmarec.training.pace import StepPace, budget_warning
from sigmarec.training.precision import HardwareCaps, detect_caps, resolve_precision

NO_BF16_CPU = HardwareCaps()
AVX512_CPU = HardwareCaps(cpu_flags=frozenset({"avx512_bf16"}))
AMX_CPU = HardwareCaps(cpu_flags=frozenset({"amx_bf16"}))
BF16_GPU = HardwareCaps(cuda_available=True, cuda_bf16=True)
OLD_GPU = HardwareCaps(cuda_available=True, cuda_bf16=False)


def test_config_default_is_auto() -> None:
    assert TrainingConfig().mixed_precision == "auto"
    assert TrainingConfig().time_budget_s is None
    with pytest.raises(ValueError):
        TrainingConfig(mixed_precision="fp32")


@pytest.mark.parametrize(("device", "caps", "expected"), [
    ("cuda", BF16_GPU, "bf16"),
    ("cuda", OLD_GPU, "no"),
    ("cpu", AVX512_CPU, "bf16"),
    ("cpu", AMX_CPU, "bf16"),
    ("cpu", NO_BF16_CPU, "no"),
    ("cpu", BF16_GPU, "no"),  # a bf16 GPU does not make CPU training native bf16
    ("mps", AVX512_CPU, "no"),
    ("xpu", BF16_GPU, "no"),
])
def test_auto(device: str, caps: HardwareCaps, expected: str) -> None:
    precision, reason = resolve_precision("auto", device, caps)
    assert precision == expected
    assert reason


def test_auto_reason_names_the_missing_cpu_flags() -> None:
    _, reason = resolve_precision("auto", "cpu", NO_BF16_CPU)
    assert "avx512_bf16" in reason and "emulated" in reason
    _, reason = resolve_precision("auto", "cpu", AMX_CPU)
    assert "amx_bf16" in reason


def test_explicit_bf16_on_a_cpu_without_it_is_honoured_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sigmarec"):
        precision, reason = resolve_precision("bf16", "cpu", NO_BF16_CPU)
    assert precision == "bf16" and "emulated" in reason
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "25x" in warnings[0].getMessage() and "auto or no" in warnings[0].getMessage()


def test_explicit_bf16_on_a_native_cpu_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sigmarec"):
        assert resolve_precision("bf16", "cpu", AVX512_CPU)[0] == "bf16"
    assert not caplog.records


@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
@pytest.mark.parametrize("caps", [NO_BF16_CPU, AVX512_CPU, BF16_GPU, OLD_GPU])
def test_explicit_no_is_always_no(device: str, caps: HardwareCaps) -> None:
    assert resolve_precision("no", device, caps)[0] == "no"


def test_fp16_is_passed_through_on_gpu_and_refused_on_cpu() -> None:
    assert resolve_precision("fp16", "cuda", BF16_GPU)[0] == "fp16"
    with pytest.raises(ConfigError):
        make_accelerator(TrainingConfig(mixed_precision="fp16"), cpu=True)


def test_detect_caps_reads_this_machine() -> None:
    caps = detect_caps()
    assert caps.cpu_flags <= {"avx512_bf16", "amx_bf16"}
    assert caps.cuda_bf16 <= caps.cuda_available


def test_make_accelerator_reports_the_resolved_precision(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sigmarec"):
        acc = make_accelerator(TrainingConfig(mixed_precision="auto"), cpu=True)
    info = describe(acc)
    expected = "bf16" if detect_caps().cpu_bf16 else "no"
    assert info["mixed_precision"] == expected
    assert info["mixed_precision_requested"] == "auto"
    assert info["mixed_precision_reason"] == resolve_precision("auto", "cpu")[1]
    assert any("sft precision:" in r.getMessage() for r in caplog.records)
    # A later accelerator with another precision in the same process gets it (state reset).
    acc = make_accelerator(TrainingConfig(mixed_precision="no"), cpu=True)
    assert describe(acc)["mixed_precision"] == "no"
    assert describe(acc)["mixed_precision_requested"] == "no"


def test_step_pace_leaves_the_first_step_out() -> None:
    pace = StepPace(window=3)
    assert pace.seconds_per_step is None and pace.postfix() == {}
    pace.update(10.0, 100)  # warm-up
    assert pace.seconds_per_step == 10.0
    for _ in range(4):
        pace.update(2.0, 400)
    assert pace.seconds_per_step == 2.0
    assert pace.tokens_per_s == 200.0
    assert pace.postfix() == {"s/step": "2", "tok/s": "200"}
    assert pace.steps == 5 and pace.total_tokens == 1700


def test_budget_warning() -> None:
    assert budget_warning(1.0, 100, 5.0, None, "bf16") is None
    assert budget_warning(1.0, 100, 5.0, 60.0, "bf16") is None  # 105 s <= 2 x 60 s
    msg = budget_warning(10.0, 100, 5.0, 60.0, "bf16")
    assert msg is not None
    assert "1005s" in msg and "60s" in msg and "10 s/step" in msg and "bf16" in msg
    assert "mixed_precision: auto or no" in msg
    msg = budget_warning(10.0, 100, 5.0, 60.0, "no")
    assert msg is not None and "precision no" in msg


def test_train_sigma_warns_once_when_far_over_the_budget(
        caplog: pytest.LogCaptureFixture) -> None:
    from test_training import build, cfg

    from sigmarec.training import train_sigma

    model, examples = build(n_examples=8)
    with caplog.at_level(logging.WARNING, logger="sigmarec"):
        result = train_sigma(model, examples, cfg(steps=5, time_budget_s=1e-3, eval_every=100,
                                                  eval_at_end=False, checkpoint_every=100),
                             seed=0, progress=False)
    over = [r.getMessage() for r in caplog.records if "time budget" in r.getMessage()]
    assert len(over) == 1 and "s/step" in over[0] and "precision no" in over[0]
    summary = result.summary()
    assert summary["tokens_per_s"] > 0 and summary["seconds_per_step"] > 0
    assert summary["mixed_precision_requested"] == "no"


def test_capped_kernel_isas_count_as_no_native_bf16(monkeypatch) -> None:
    # ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY below the BF16 instructions make torch emulate
    # bf16 whatever the CPU offers (this is how BENCHMARKS.md stands in for an AVX2-only CPU).
    import torch

    from sigmarec.training import precision

    bf16 = frozenset({"avx512_bf16"})
    monkeypatch.setattr(precision, "_cpu_flags", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert precision.detect_caps().cpu_flags == bf16
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert precision.detect_caps().cpu_flags == frozenset()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert precision.detect_caps().cpu_flags == bf16
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert precision.detect_caps().cpu_flags == frozenset()
    assert precision.resolve_precision("auto", "cpu", precision.detect_caps())[0] == "no"
