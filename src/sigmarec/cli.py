"""The ``sigma`` command."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.table import Table

from sigmarec.cli_common import (
    ConfigOpt,
    OutOpt,
    ProfileOpt,
    SetOpt,
    command_config,
    console,
    run_dir_of,
    setup_logging,
)
from sigmarec.errors import SigmaError
from sigmarec.serving.cli_items import register as _serving_items
from sigmarec.serving.cli_nearline import register as _serving_nearline
from sigmarec.serving.cli_recommend import register as _serving_recommend

# Models and data come from installed packages only; never reach for a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="SIGMA: one instruction-driven LLM recommender for many tasks.",
)
data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets.")
app.add_typer(data_app, name="data")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (recorded in BENCHMARKS.md).")
app.add_typer(bench_app, name="bench")
sft_app = typer.Typer(no_args_is_help=True, help="Inspect the instruction (SFT) data.")
app.add_typer(sft_app, name="sft")
exp_app = typer.Typer(no_args_is_help=True, help="Multi-run experiments.")
app.add_typer(exp_app, name="experiment")
# Serving commands live beside their code; each module adds its own.
for _register in (_serving_recommend, _serving_nearline, _serving_items):
    _register(app)


@app.command()
def run(
    config: ConfigOpt = None,
    profile: ProfileOpt = "default",
    out: OutOpt = None,
    force: Annotated[
        list[str] | None,
        typer.Option("--force", help="recompute this stage (repeatable; 'all' for every stage)"),
    ] = None,
    until: Annotated[str | None, typer.Option(help="stop after this stage")] = None,
    only: Annotated[list[str] | None, typer.Option(
        "--only", help="run just this stage (repeatable); its inputs must exist")] = None,
    sets: SetOpt = None,
    verbose: bool = False,
) -> None:
    """Run every stage into the run directory, skipping stages that are up to date."""
    from sigmarec.pipeline import run_pipeline

    setup_logging(verbose)
    cfg = command_config(profile, config, sets)
    run_dir = run_dir_of(out, cfg)
    manifests = run_pipeline(cfg, run_dir, force=force, until=until, only=only)
    _print_stage_table(manifests)
    metrics = run_dir / "evaluation" / "metrics.json"
    if metrics.is_file() and (until is None or until == "evaluation") and (
        not only or "evaluation" in only
    ):
        _print_metrics(run_dir / "evaluation")
    console.print(f"run directory: {run_dir}")


def _print_stage_table(manifests: list[dict]) -> None:
    t = Table(title="stages")
    for col in ("stage", "status", "wall time (s)", "peak memory (MiB)"):
        t.add_column(col)
    for m in manifests:
        t.add_row(
            m["stage"],
            "skipped (up to date)" if m.get("skipped") else "ran",
            f"{m['wall_time_s']:.1f}",
            f"{m['peak_memory_mb']:.0f}",
        )
    console.print(t)


@app.command()
def status(
    config: ConfigOpt = None,
    profile: ProfileOpt = "default",
    out: OutOpt = None,
    sets: SetOpt = None,
) -> None:
    """Show which stages of a run directory are fresh, stale or missing."""
    from sigmarec.pipeline import status as pipeline_status

    cfg = command_config(profile, config, sets)
    rows = pipeline_status(cfg, run_dir_of(out, cfg))
    t = Table(title=str(run_dir_of(out, cfg)))
    for col in ("stage", "state", "wall time (s)", "peak memory (MiB)"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r["stage"], r["state"], str(r["wall_time_s"] or ""), str(r["peak_memory_mb"] or "")
        )
    console.print(t)


@app.command()
def results(
    config: ConfigOpt = None,
    profile: ProfileOpt = "default",
    out: OutOpt = None,
    sets: SetOpt = None,
) -> None:
    """Print the metrics table of a finished run."""

    cfg = command_config(profile, config, sets)
    path = run_dir_of(out, cfg) / "evaluation" / "metrics.json"
    if not path.is_file():
        raise SigmaError(f"{path}: no metrics yet; run `sigma run` first")
    _print_metrics(path.parent)


def _print_metrics(folder: Path) -> None:
    """The next-basket table (every user) and the instruction-task table."""
    from sigmarec.evaluation.report import print_results, print_task_results

    console.print("[bold]Next basket, every household[/bold] (classical baselines)")
    print_results(json.loads((folder / "metrics.json").read_text()), console=console)
    tasks = folder / "metrics_tasks.json"
    if tasks.is_file():
        print_task_results(json.loads(tasks.read_text()), console=console)
    diag = folder.parent / "generation" / "diagnostics.json"
    if diag.is_file():
        from sigmarec.evaluation.report import print_diagnostics

        print_diagnostics(json.loads(diag.read_text()), console=console)


@app.command("config")
def showcommand_config(
    config: ConfigOpt = None, profile: ProfileOpt = "default", sets: SetOpt = None
) -> None:
    """Print the resolved config (defaults <- profile <- files <- --set)."""
    import yaml

    cfg = command_config(profile, config, sets)
    console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@data_app.command("stats")
def data_stats(
    dataset: Annotated[
        str | None,
        typer.Option(
            help="completejourney, ml100k, files or amazon (default: the config's source)"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    config: ConfigOpt = None,
    profile: ProfileOpt = "default",
    sets: SetOpt = None,
) -> None:
    """Users, items, interactions, baskets, time range and distribution quantiles of a source."""
    from sigmarec.data.sources import load_source
    from sigmarec.data.stats import dataset_stats, format_table

    overrides = list(sets or []) + ([f"data.source={dataset}"] if dataset else [])
    cfg = command_config(profile, config, overrides)
    stats = dataset_stats(load_source(cfg.data))
    if as_json:
        print(json.dumps(stats, indent=2, default=str))
        return
    t = Table(title=f"dataset {stats['dataset']}")
    t.add_column("stat")
    t.add_column("value")
    for _, row in format_table(stats).iterrows():
        t.add_row(str(row["stat"]), str(row["value"]))
    for key in ("sequence_length_quantiles", "item_popularity_quantiles"):
        t.add_row(key, ", ".join(f"{k}={v:g}" for k, v in stats[key].items()))
    console.print(t)


@sft_app.command("show")
def sft_show(
    task: Annotated[str, typer.Option(help="JustForYou, Query, Category, Longtail, Discover, "
                                      "Season or Holiday")] = "JustForYou",
    n: Annotated[int, typer.Option("-n", help="how many samples")] = 3,
    split: Annotated[str, typer.Option(help="train, valid or test")] = "train",
    config: ConfigOpt = None, profile: ProfileOpt = "default", out: OutOpt = None,
    sets: SetOpt = None, verbose: bool = False,
) -> None:
    """Print decoded SFT samples (prompt with item texts in place of soft tokens, and label)."""
    import pandas as pd

    from sigmarec.pipeline import run_pipeline
    from sigmarec.tasks.prompt_style import load_prompt_style
    from sigmarec.tasks.registry import get_task_class
    from sigmarec.tasks.sft_data import decode_sample
    from sigmarec.tokenization.artifacts import load_vocab

    task = get_task_class(task).name  # unknown: a one-line error listing the known tasks
    if split not in ("train", "valid", "test"):
        raise SigmaError(f"--split must be train, valid or test, got {split!r}")
    if n < 1 or n > 1000:
        raise SigmaError(f"-n must be between 1 and 1000, got {n}")
    setup_logging(verbose)
    cfg = command_config(profile, config, sets)
    run_dir = run_dir_of(out, cfg)
    run_pipeline(cfg, run_dir, until="tasks")
    samples = pd.read_parquet(run_dir / "tasks" / f"{split}.parquet")
    samples = samples[samples["task"] == task]
    if samples.empty:
        raise SigmaError(f"no {split} samples for task {task!r} in {run_dir / 'tasks'} "
                         f"(the task may be unsupported by this dataset; see its stats.json)")
    items = pd.read_parquet(run_dir / "data" / "items.parquet")
    vocab, prefix = load_vocab(run_dir / "tokenization")
    style = load_prompt_style(run_dir / "tasks")
    for i, row in enumerate(samples.head(n).itertuples(index=False)):
        console.rule(f"{task} - {split} sample {i + 1}")
        console.print(decode_sample(row, items, vocab, prefix, style=style), markup=False,
                      highlight=False)


@bench_app.command("grounding")
def bench_grounding(config: ConfigOpt = None, profile: ProfileOpt = "default", out: OutOpt = None,
                    sets: SetOpt = None, verbose: bool = False) -> None:
    """Nearest-neighbour Recall@10/50 of validation co-purchases and same-category pairs for the
    untrained backbone, all-MiniLM-L6-v2, SASRec item IDs and grounded v_text."""
    import pandas as pd

    from sigmarec.pipeline import run_pipeline

    setup_logging(verbose)
    cfg = command_config(profile, config, sets)
    run_dir = run_dir_of(out, cfg)
    manifests = run_pipeline(cfg, run_dir, until="grounding")
    _print_stage_table(manifests)
    table = pd.read_csv(run_dir / "grounding" / "benchmark.csv")
    t = Table(title=f"grounding benchmark ({cfg.profile}, {cfg.data.source})")
    for col in table.columns:
        t.add_column(str(col))
    for _, row in table.iterrows():
        t.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    console.print(t)


@app.command()
def evaluate(config: ConfigOpt = None, profile: ProfileOpt = "default", out: OutOpt = None,
             sets: SetOpt = None, verbose: bool = False) -> None:
    """Score every model on every task (runs the stages up to evaluation where they are not up
    to date) and print the next-basket and instruction-task tables."""
    from sigmarec.pipeline import run_pipeline

    setup_logging(verbose)
    cfg = command_config(profile, config, sets)
    run_dir = run_dir_of(out, cfg)
    run_pipeline(cfg, run_dir, until="evaluation")
    _print_metrics(run_dir / "evaluation")


@app.command()
def report(config: ConfigOpt = None, profile: ProfileOpt = "default", out: OutOpt = None,
           sets: SetOpt = None) -> None:
    """Write <run>/report/report.md with PNG plots (per-task bars, the APF tau curve, prefix
    utilisation, example recommendations). For a comparison directory, over its seeds."""
    from sigmarec.evaluation.markdown import write_report

    cfg = command_config(profile, config, sets)
    md = write_report(run_dir_of(out, cfg))
    console.print(f"report: {md}")


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SigmaError(f"--{name} must be comma-separated integers, got {text!r}") from None


@exp_app.command("compare")
def experiment_compare(
    config: ConfigOpt = None,
    profile: ProfileOpt = "default",
    out: OutOpt = None,
    sets: SetOpt = None,
    seeds: Annotated[str, typer.Option(help="seeds of the main runs")] = "0,1,2",
    ablations: Annotated[str, typer.Option(
        help="comma-separated variants of sigmarec.experiment.ABLATIONS (e.g. no_grounding, "
             "two_level, no_frequent, no_task_gates, dense, align, paper_objective, and the "
             "backbone ablated: no_llm (zero layers), frozen_llm (no LoRA); "
             "docs/generation.md lists them), or empty; one that changes nothing in the "
             "config is refused")] = (
        "no_grounding,two_level"),
    gr_seeds: Annotated[str, typer.Option(help="seeds that also train GR(SID)/GR(ID)")] = "0",
    ablation_seeds: Annotated[str, typer.Option(help="seeds that run the ablations")] = "0",
    share_upstream: Annotated[bool, typer.Option(
        help="later seeds link the first seed's data/baselines/grounding (SFT and decoding "
             "seeds vary, the classical baselines' do not)")] = False,
    verbose: bool = False,
) -> None:
    """SIGMA vs the classical and generative baselines and its ablations, over seeds; then the
    report. Resumable: finished runs and stages are skipped."""
    from sigmarec.evaluation.markdown import write_report
    from sigmarec.evaluation.report import print_task_results
    from sigmarec.experiment import run_comparison

    setup_logging(verbose)
    cfg = command_config(profile, config, sets)
    out_dir = out if out is not None else Path("runs") / f"{cfg.profile}-compare"
    record = run_comparison(cfg, out_dir, _ints(seeds, "seeds"),
                            [a for a in ablations.split(",") if a.strip()],
                            _ints(gr_seeds, "gr-seeds"), _ints(ablation_seeds, "ablation-seeds"),
                            share_upstream)
    first = Path(record["runs"][0]["dir"]) / "evaluation" / "metrics_tasks.json"
    if first.is_file():
        print_task_results(json.loads(first.read_text()), console=console)
    console.print(f"comparison wall time {record['wall_time_s']:.0f} s; "
                  f"report: {write_report(out_dir)}")


@bench_app.command("generate")
def bench_generate_cmd(config: ConfigOpt = None, profile: ProfileOpt = "default",
                       out: OutOpt = None, sets: SetOpt = None,
                       users: Annotated[int, typer.Option(help="requests timed")] = 64,
                       batch_size: Annotated[int, typer.Option(help="throughput batch")] = 16,
                       verbose: bool = False) -> None:
    """Speed of SIGMA's three steps vs GR(SID) beam search (same K) vs a bare forward pass, as
    ratios; runs the pipeline up to training first if needed."""
    from sigmarec.core.atomic import write_json
    from sigmarec.generation.bench import bench_generate
    from sigmarec.pipeline import run_pipeline

    if users < 1 or batch_size < 1:
        raise SigmaError(f"--users ({users}) and --batch-size ({batch_size}) must be >= 1")
    setup_logging(verbose)
    cfg = command_config(profile, config, sets)
    run_dir = run_dir_of(out, cfg)
    run_pipeline(cfg, run_dir, until="training")
    df = bench_generate(cfg, run_dir, users, batch_size)
    write_json(run_dir / "bench_generate.json", {"users": users, "batch_size": batch_size,
                                                 "threads": torch_threads(),
                                                 "rows": df.reset_index().to_dict("records")})
    t = Table(title=f"bench generate ({cfg.profile}, {users} requests, batch {batch_size})")
    t.add_column("method")
    cols = [c for c in df.columns if c != "weights"]
    for c in cols:
        t.add_column(c, justify="right")
    for name, row in df.iterrows():
        t.add_row(str(name), *[f"{row[c]:.3g}" for c in cols])
    console.print(t)
    if "weights" in df.columns and df["weights"].notna().any():
        console.print(f"GR(SID) weights: {df['weights'].dropna().iloc[0]}")


@bench_app.command("sft")
def bench_sft_cmd(config: ConfigOpt = None, profile: ProfileOpt = "default",
                  out: OutOpt = None, sets: SetOpt = None,
                  precisions: Annotated[str, typer.Option(
                      help="comma-separated: no, bf16, auto")] = "no,bf16",
                  steps: Annotated[int, typer.Option(help="steps per precision (first one "
                                                     "not timed)")] = 6,
                  verbose: bool = False) -> None:
    """Seconds per SFT step under each precision, as ratios to fp32 in one process; runs the
    pipeline up to the tasks stage first if needed. ATEN_CPU_CAPABILITY=avx2 shows a CPU
    without native bf16."""
    from sigmarec.core.atomic import write_json
    from sigmarec.pipeline import run_pipeline
    from sigmarec.training.bench import bench_sft
    from sigmarec.training.precision import detect_caps

    precs = [p.strip() for p in precisions.split(",") if p.strip()]
    bad = [p for p in precs if p not in ("no", "bf16", "auto")]
    if bad or not precs or steps < 2:
        raise SigmaError(f"--precisions must name no/bf16/auto (got {precisions!r}) and "
                         f"--steps must be >= 2 (got {steps})")
    setup_logging(verbose)
    cfg = command_config(profile, config, sets)
    run_dir = run_dir_of(out, cfg)
    run_pipeline(cfg, run_dir, until="tasks")
    df = bench_sft(cfg, run_dir, precs, steps)
    import os

    import torch

    facts = {"cpu_bf16_flags": sorted(detect_caps().cpu_flags),
             "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
             "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
             "threads": torch_threads(), "steps": steps}
    write_json(run_dir / "bench_sft.json", {**facts,
                                            "rows": df.reset_index().to_dict("records")})
    t = Table(title=f"bench sft ({cfg.profile}, batch {cfg.training.per_device_batch_size}; "
                    f"{facts})")
    for c in ("requested", "resolved", "s/step", "tokens/s", "vs fp32"):
        t.add_column(c, justify="right")
    for name, row in df.iterrows():
        t.add_row(str(name), row["resolved"], f"{row['s_per_step']:.3f}",
                  f"{row['tokens_per_s']:.0f}", f"{row['vs_fp32']:.2f}")
    console.print(t)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    """Entry point: user errors print one line and exit 2, never a traceback."""
    try:
        app(standalone_mode=False)
    except SigmaError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.exceptions.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
