"""The SFT training loop (SIGMA part 3) on accelerate: CPU, one GPU or many, one code path.

* Data order: an endless stream of seeded per-epoch permutations of the examples. Micro-batch
  ``m`` of process ``r`` takes stream positions ``((m * world) + r) * B ... + B``, so the order
  is a pure function of (seed, step): resuming needs no sampler state and every process always
  gets a full batch. Hard negatives are drawn with an RNG seeded by (seed, micro-batch, rank).
* Optimisation: AdamW (two learning rates: backbone vs the new modules), linear warm-up then
  linear decay to zero, gradient clipping, gradient accumulation through
  ``accelerator.accumulate`` (no gradient all-reduce on the accumulating micro-steps).
* Checkpoints every ``checkpoint_every`` steps into ``checkpoint_dir/step-XXXXXXXX``:
  ``accelerator.save_state`` (optimizer, scheduler, every process's RNG states, the accumulation
  counter) with a hook that stores only the trainable weights (not the frozen backbone), plus
  ``trainer_state.json`` (step, history, best) written last as the completion marker. A run
  started with a complete checkpoint in ``checkpoint_dir`` resumes from it and produces the
  same numbers as the uninterrupted run.
* Validation every ``eval_every`` steps: the SFT losses on held-out examples (sharded over the
  processes) and an optional caller-supplied callback (e.g. a quick HR@10 through generation),
  so this module does not depend on generation code. The best weights by ``select_metric`` are
  kept and restored at the end.
"""

from __future__ import annotations

import json
import logging
import math
import re
import resource
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sigmarec.core.atomic import write_json
from sigmarec.model.sigma import SigmaModel
from sigmarec.training.config import TrainingConfig
from sigmarec.training.distributed import describe, make_accelerator
from sigmarec.training.pace import WARMUP_STEPS, StepPace, budget_warning

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("sigmarec")

ValidateFn = Callable[[SigmaModel, int], Mapping[str, float]]

TRAINER_STATE = "trainer_state.json"
MODEL_SUBDIR = "sigma"
BEST_SUBDIR = "best"
_CKPT_RE = re.compile(r"^step-(\d{8})$")
_METRICS = ("loss", "l_ntp", "l_infonce", "l_ntp_dense", "l_infonce_dense", "prefix_acc",
            "item_acc")
# Offsets the validation RNG streams away from the training ones.
_VALID_STREAM = 1 << 40


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one record per step
    validations: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    resumed_from: int | None = None
    best: dict[str, float] | None = None  # the validation record of the restored weights
    stopped_early: bool = False  # ``stop_after`` ended the call before ``cfg.steps``
    seconds: float = 0.0
    seconds_per_step: float | None = None
    tokens_per_s: float | None = None  # attention-mask tokens of all processes per second
    peak_memory_mb: float | None = None
    setup: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Small dict for a stage manifest."""
        last = self.history[-1] if self.history else {}
        return {
            "steps": self.steps,
            "resumed_from": self.resumed_from,
            "final_loss": last.get("loss"),
            "best": self.best,
            "seconds": round(self.seconds, 2),
            "seconds_per_step": self.seconds_per_step,
            "tokens_per_s": self.tokens_per_s,
            "peak_memory_mb": self.peak_memory_mb,
            **self.setup,
        }


class ExampleStream:
    """Example indices in a deterministic endless order: epoch e = permutation(seed, e)."""

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ValueError("no training examples")
        self.n, self.seed = n, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def take(self, start: int, count: int) -> np.ndarray:
        pos = np.arange(start, start + count)
        return np.array([self._perm(int(p // self.n))[p % self.n] for p in pos], dtype=np.int64)


def lr_lambda(steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up to 1 over ``warmup`` steps, then linear decay to 0 at ``steps``."""

    def f(done: int) -> float:
        if done < warmup:
            return (done + 1) / warmup  # never a zero learning rate on the first step
        return max(0.0, (steps - done) / max(1, steps - warmup))

    return f


def param_groups(model: SigmaModel, cfg: TrainingConfig) -> list[dict[str, Any]]:
    """Backbone weights at ``lr``, new modules at ``new_params_lr``, the copy gates' biases (and
    per-task offsets) of a repeat-aware model at ``gate_lr``; decay on matrices only."""
    buckets: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        gate = name.endswith(("repeat.proj.bias", "repeat.task_bias.weight"))
        kind = "backbone" if name.startswith("backbone.") else "gate" if gate else "new"
        # New token rows are embeddings: decaying them would pull them toward zero (nor the
        # per-task gate offsets, biases by another name).
        decay = (p.ndim >= 2 and not name.endswith("_delta") and "norm" not in name
                 and not gate)
        buckets.setdefault((kind, decay), []).append(p)
    lrs = {"backbone": cfg.lr, "new": cfg.new_params_lr, "gate": cfg.gate_lr}
    return [
        {"params": ps, "lr": lrs[kind], "weight_decay": cfg.weight_decay if decay else 0.0,
         "name": kind + ("" if decay else "_no_decay")}
        for (kind, decay), ps in sorted(buckets.items())
    ]


def train_sigma(
    model: SigmaModel,
    train_examples: Sequence[Any],
    cfg: TrainingConfig,
    *,
    seed: int = 0,
    checkpoint_dir: Path | None = None,
    valid_examples: Sequence[Any] | None = None,
    validate_fn: ValidateFn | None = None,
    accelerator: Accelerator | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    output_dir: Path | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` optimizer steps; see the module docstring.

    ``validate_fn(model, step)`` runs on every process (eval mode, no grad) with the unwrapped
    model and returns metrics (it may compute on the main process only and return {} elsewhere;
    the main process's dict is used). ``stop_after`` ends this call after that many steps, as an
    interruption would (no final validation, no best-weights restore): for tests and time-boxed
    runs. ``output_dir``: where the final (or restored best) weights are written with
    :meth:`SigmaModel.save_trainable`. ``cfg.seed`` overrides ``seed`` when set. The
    accelerator (given or made here) is left free of this run's objects afterwards.
    """
    from accelerate.utils import broadcast_object_list, set_seed

    seed = cfg.seed if cfg.seed is not None else seed
    acc = accelerator or make_accelerator(cfg)
    t_start = time.perf_counter()
    # Per-process seeds (seed + rank): dropout masks differ across data-parallel ranks.
    set_seed(seed, device_specific=True)
    world, rank = acc.num_processes, acc.process_index
    bsz = cfg.per_device_batch_size
    collate = model.collator(cfg.hard_negatives, cfg.pad_to_multiple_of)
    stream = ExampleStream(len(train_examples), seed)

    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr)
    warmup = round(cfg.warmup_ratio * cfg.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.steps, warmup))
    with warnings.catch_warnings():
        # torch deprecates DDP's broadcast_buffers, but accelerate offers no successor yet and
        # the replacement would still sync the item-feature buffers at start-up.
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*deprecated.*")
        model_p, opt_p = acc.prepare(model, opt)
    # The scheduler is stepped by hand once per optimizer step: accelerate's wrapper would step
    # it once per process (it assumes a schedule written for one process).
    acc.register_for_checkpointing(sched)
    accum = acc.gradient_accumulation_steps  # DeepSpeed's config may override ours
    if accum != cfg.grad_accum_steps:
        log.warning("gradient accumulation: %d steps from the launcher config (training config "
                    "says %d)", accum, cfg.grad_accum_steps)
    hooks = _register_hooks(acc, model)

    result = TrainResult(setup={**describe(acc), "per_device_batch_size": bsz,
                                "global_batch_size": bsz * accum * world,
                                "trainable_params": sum(p.numel() for p in model.parameters()
                                                        if p.requires_grad)})
    start = 0
    best_state: dict[str, torch.Tensor] | None = None
    ckpt = _latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        acc.load_state(str(ckpt))
        state = json.loads((ckpt / TRAINER_STATE).read_text())
        start = int(state["step"])
        if state.get("world_size", world) != world:
            # The data order is a function of (step, world size): it changes with the latter.
            log.warning("sft: checkpoint was written by %s processes, resuming on %d: the data "
                        "order after the resume differs from the original run's",
                        state.get("world_size"), world)
        result.history, result.validations = state["history"], state["validations"]
        result.best, result.resumed_from = state["best"], start
        if (ckpt / BEST_SUBDIR).is_dir():
            from safetensors.torch import load_file

            best_state = load_file(str(ckpt / BEST_SUBDIR / "weights.safetensors"))
        log.info("sft: resumed from %s at step %d", ckpt, start)

    trainable = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=cfg.steps, initial=start, desc="sft", unit="step", dynamic_ncols=True,
               disable=not (progress and acc.is_local_main_process), file=sys.stderr)
    t_loop, steps_run, pace = time.perf_counter(), 0, StepPace()
    step = start
    for step in range(start, cfg.steps):
        if stop_after is not None and step - start >= stop_after:
            result.stopped_early = True
            break
        model_p.train()
        t_step = time.perf_counter()
        sums = torch.zeros(len(_METRICS) + 1, device=acc.device)
        for a in range(accum):
            micro = step * accum + a
            idx = stream.take((micro * world + rank) * bsz, bsz)
            batch = collate([train_examples[i] for i in idx],
                            rng=np.random.default_rng([seed, micro, rank]))
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            with acc.accumulate(model_p):
                out = model_p(**batch)
                acc.backward(out["loss"])
                if acc.sync_gradients and cfg.max_grad_norm is not None:
                    acc.clip_grad_norm_(trainable, cfg.max_grad_norm)
                opt_p.step()  # a no-op on accumulating micro-steps
                opt_p.zero_grad(set_to_none=True)
            sums[:-1] += torch.stack([out[k].detach().float() for k in _METRICS]) / accum
            sums[-1] += batch["attention_mask"].sum()
        if not opt_p.step_was_skipped:  # fp16 overflow: the optimizer did not step
            sched.step()
        sums = acc.reduce(sums, reduction="sum")
        rec = {"step": step + 1, **{k: float(sums[i]) / world for i, k in enumerate(_METRICS)},
               "tokens": int(sums[-1]), "lr": float(sched.get_last_lr()[0]),
               "seconds": round(time.perf_counter() - t_step, 4)}
        result.history.append(rec)
        steps_run += 1
        pace.update(rec["seconds"], rec["tokens"])
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", ntp=f"{rec['l_ntp']:.3f}",
                        nce=f"{rec['l_infonce']:.3f}", **pace.postfix())
        if steps_run == WARMUP_STEPS and acc.is_main_process and (msg := budget_warning(
                pace.seconds_per_step, cfg.steps - step - 1, time.perf_counter() - t_start,
                cfg.time_budget_s, str(acc.mixed_precision))):
            log.warning(msg)
        done = step + 1
        if done % cfg.log_every == 0:
            log.debug("sft step %d: %s", done, rec)

        last = done == cfg.steps
        if (done % cfg.eval_every == 0 or (last and cfg.eval_at_end)) and (
                valid_examples or validate_fn is not None):
            val = _validate(model_p, acc, collate, valid_examples, validate_fn, cfg, seed, done)
            val = broadcast_object_list([val], from_process=0)[0]
            result.validations.append(val)
            log.info("sft step %d validation: %s", done,
                     ", ".join(f"{k}={v:.4f}" for k, v in val.items() if k != "step"))
            metric = val.get(cfg.select_metric)
            if metric is not None and _better(metric, result.best, cfg):
                result.best = val
                best_state = _trainable_state(acc, model_p, model)
        if checkpoint_dir is not None and (done % cfg.checkpoint_every == 0 or last):
            _save_checkpoint(acc, Path(checkpoint_dir), done, result, best_state, model, cfg)
    bar.close()

    result.steps = len(result.history)
    result.seconds = time.perf_counter() - t_start
    if steps_run:
        result.seconds_per_step = round((time.perf_counter() - t_loop) / steps_run, 4)
        result.tokens_per_s = round(pace.total_tokens / (time.perf_counter() - t_loop), 1)
    result.peak_memory_mb = _peak_memory_mb(acc.device)
    if not result.stopped_early and cfg.restore_best and best_state is not None:
        _load_trainable(acc, model_p, model, best_state)
        log.info("sft: restored the best weights (step %d, %s=%.4f)", int(result.best["step"]),
                 cfg.select_metric, result.best[cfg.select_metric])
    if output_dir is not None and not result.stopped_early:
        save_trained(acc, model_p, model, Path(output_dir))
    # Hand back a plain module (without the autocast wrapper accelerate put on forward) and an
    # accelerator that holds nothing of this run, so it can serve another training.
    acc.unwrap_model(model_p, keep_fp32_wrapper=False)
    for handle in hooks:
        handle.remove()
    acc._custom_objects = [o for o in acc._custom_objects if o is not sched]
    acc.free_memory()
    model.eval()
    acc.wait_for_everyone()
    return result


def save_trained(accelerator: Accelerator, prepared: torch.nn.Module, model: SigmaModel,
                 folder: Path) -> None:
    """Write the trained weights (:meth:`SigmaModel.save_trainable`) from the main process;
    every process must call it (under FSDP the weights are gathered collectively)."""
    state = _trainable_state(accelerator, prepared, model)
    if accelerator.is_main_process:
        model.save_trainable(Path(folder), state)
    accelerator.wait_for_everyone()


# -------------------------------------------------------------------------------- validation


@torch.no_grad()
def _validate(model_p: torch.nn.Module, acc: Accelerator, collate: Any,
              examples: Sequence[Any] | None, validate_fn: ValidateFn | None,
              cfg: TrainingConfig, seed: int, step: int) -> dict[str, float]:
    out: dict[str, float] = {"step": float(step)}
    model_p.eval()
    if examples:
        if cfg.max_valid_examples is not None:
            examples = examples[: cfg.max_valid_examples]
        bsz = cfg.valid_batch_size or cfg.per_device_batch_size
        n_batches = math.ceil(len(examples) / bsz)
        per_rank = math.ceil(n_batches / acc.num_processes)
        totals = torch.zeros(len(_METRICS) + 1, device=acc.device)
        for j in range(per_rank):
            b = acc.process_index + j * acc.num_processes
            # Every process runs the same number of forwards (FSDP gathers weights in each);
            # a process past the end repeats batch 0 with weight 0.
            weight = 1.0 if b < n_batches else 0.0
            b = b if b < n_batches else 0
            chunk = examples[b * bsz:(b + 1) * bsz]
            # Fixed negatives per validation batch, so the loss is comparable across steps.
            batch = collate(chunk, rng=np.random.default_rng([seed, _VALID_STREAM + b]))
            res = model_p(**{k: v.to(acc.device) for k, v in batch.items()})
            n = len(chunk) * weight
            totals[:-1] += torch.stack([res[k].float() for k in _METRICS]) * n
            totals[-1] += n
        totals = acc.reduce(totals, reduction="sum")
        count = float(totals[-1])
        out.update({f"valid_{k}": float(totals[i]) / count for i, k in enumerate(_METRICS)})
    if validate_fn is not None:
        with acc.autocast():
            extra = dict(validate_fn(acc.unwrap_model(model_p), step) or {})
        out.update({k: float(v) for k, v in extra.items()})
    model_p.train()
    return out


def _better(value: float, best: Mapping[str, float] | None, cfg: TrainingConfig) -> bool:
    if best is None or cfg.select_metric not in best:
        return True
    old = best[cfg.select_metric]
    return value < old if cfg.select_mode == "min" else value > old


# -------------------------------------------------------------------------------- state


def _is_sharded(acc: Accelerator) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _trainable_state(acc: Accelerator, prepared: torch.nn.Module,
                     model: SigmaModel) -> dict[str, torch.Tensor]:
    if _is_sharded(acc):
        # Collective: gathers the full weights (on the main process for FSDP).
        return model.trainable_state(acc.get_state_dict(prepared))
    return model.trainable_state()


def _load_trainable(acc: Accelerator, prepared: torch.nn.Module, model: SigmaModel,
                    state: Mapping[str, torch.Tensor]) -> None:
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        set_model_state_dict(prepared, dict(state),
                             options=StateDictOptions(full_state_dict=True, strict=False,
                                                      broadcast_from_rank0=True))
        return
    device = next(model.parameters()).device
    model.load_trainable_state({k: v.to(device) for k, v in state.items()})


def _register_hooks(acc: Accelerator, model: SigmaModel) -> list[Any]:
    """Checkpoints hold only the trainable weights: the frozen backbone is rebuilt from its
    source, so a LoRA checkpoint is megabytes, not the whole model. (FSDP and DeepSpeed keep
    their own sharded formats: accelerate passes no weights to these hooks then.)"""

    def save_hook(models: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
        if not weights:
            return
        weights.clear()
        if acc.is_main_process:
            model.save_trainable(Path(output_dir) / MODEL_SUBDIR)

    def load_hook(models: list[torch.nn.Module], input_dir: str) -> None:
        if not models:
            return
        models.clear()
        model.load_trainable(Path(input_dir) / MODEL_SUBDIR)

    return [acc.register_save_state_pre_hook(save_hook),
            acc.register_load_state_pre_hook(load_hook)]


def _save_checkpoint(acc: Accelerator, root: Path, step: int, result: TrainResult,
                     best_state: Mapping[str, torch.Tensor] | None, model: SigmaModel,
                     cfg: TrainingConfig) -> None:
    folder = root / f"step-{step:08d}"
    if acc.is_main_process and folder.exists():
        shutil.rmtree(folder)  # an incomplete leftover of a killed save
    acc.wait_for_everyone()
    acc.save_state(str(folder))
    if acc.is_main_process:
        if best_state is not None:
            from safetensors.torch import save_file

            (folder / BEST_SUBDIR).mkdir(exist_ok=True)
            save_file(dict(best_state), str(folder / BEST_SUBDIR / "weights.safetensors"))
        # Written last: its presence marks the checkpoint complete.
        write_json(folder / TRAINER_STATE, {
            "step": step, "history": result.history, "validations": result.validations,
            "best": result.best, "config": cfg.model_dump(mode="json"),
            "world_size": acc.num_processes,
        })
        complete = sorted(p for p in root.iterdir() if _CKPT_RE.match(p.name)
                          and (p / TRAINER_STATE).is_file())
        for old in complete[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        for p in root.iterdir():
            if _CKPT_RE.match(p.name) and not (p / TRAINER_STATE).is_file():
                shutil.rmtree(p, ignore_errors=True)
    acc.wait_for_everyone()


def _latest_checkpoint(root: Path) -> Path | None:
    root = Path(root)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if _CKPT_RE.match(p.name)
                  and (p / TRAINER_STATE).is_file())
    return done[-1] if done else None


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
