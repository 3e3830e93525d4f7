"""Report plots (matplotlib, Agg backend: no display needed): per-task bars, the tau curve,
prefix utilisation. Each function writes one PNG and returns its path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def task_bars(table: pd.DataFrame, path: Path, title: str,
              errors: pd.DataFrame | None = None) -> Path:
    """Grouped bars: one group per task (columns), one bar per model (rows)."""
    tasks, models = list(table.columns), list(table.index)
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.3 * len(tasks) + 2), 4.5))
    x = np.arange(len(tasks))
    cmap = plt.get_cmap("tab20")
    for i, model in enumerate(models):
        err = None if errors is None else errors.loc[model, tasks].to_numpy(dtype=float)
        ax.bar(x + (i - (len(models) - 1) / 2) * width, table.loc[model, tasks].to_numpy(float),
               width, label=model, color=cmap(i % 20), yerr=err, capsize=2)
    ax.set_xticks(x, tasks, rotation=20, ha="right")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tau_curve(curve: pd.DataFrame, path: Path, split: str = "test",
              diversity: str = "Categories@10") -> Path:
    """Accuracy vs diversity as the fixed temperature varies, with the adaptive, joint and off
    points."""
    df = curve[curve["split"] == split]
    fixed = df[df["mode"] == "fixed"].sort_values("tau")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(fixed[diversity], fixed["HR@10"], "o-", label="fixed tau")
    for _, r in fixed.iterrows():
        ax.annotate(f"{r['tau']:g}", (r[diversity], r["HR@10"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
    for mode, marker in (("adaptive", "*"), ("joint", "D"), ("off", "s")):
        pt = df[df["mode"] == mode]
        if len(pt):
            ax.plot(pt[diversity], pt["HR@10"], marker, markersize=12, label=mode)
    ax.set_xlabel(f"{diversity} (distinct categories in the top 10)")
    ax.set_ylabel("HR@10 (mean over tasks)")
    ax.set_title(f"Fusion: accuracy vs diversity ({split})")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def prefix_usage(usage: dict[str, Any], path: Path) -> Path:
    """Left: prefixes per top-10 list. Right: items per prefix vs how often it is recommended."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    hist = usage["prefixes_per_top10_hist"]
    a.bar(range(len(hist)), hist)
    a.set_xlabel("distinct prefixes in a top-10 list")
    a.set_ylabel("lists")
    sizes, hits = np.asarray(usage["prefix_sizes"]), np.asarray(usage["prefix_hits"])
    b.scatter(sizes, hits, s=8, alpha=0.6)
    b.set_xlabel("items under the prefix")
    b.set_ylabel("times in a top-10 (test)")
    b.set_title(f"{usage['prefixes_used']} of {usage['n_prefixes']} prefixes used")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def learning_curve(lc: dict[str, Any], path: Path) -> Path:
    """SFT validation figures against steps (left: prefix NTP and references; right: hit
    rates), the wall time of each point on the top axis."""
    val = pd.DataFrame(lc["validations"])
    refs = lc.get("references", {})
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    if "valid_prefix_ntp" in val:
        a.plot(val["step"], val["valid_prefix_ntp"], "o-", label="SIGMA")
    for key, name in (("ref_ntp_prior", "prior"), ("ref_ntp_history", "prompt prefixes + prior")):
        if key in refs:
            a.axhline(refs[key], ls="--", lw=1, color="grey" if key.endswith("prior") else "k",
                      label=name)
    a.set_xlabel("SFT step")
    a.set_ylabel("prefix NTP (validation)")
    a.legend(frameon=False, fontsize=8)
    for col in [c for c in val.columns if c.startswith(("prefix_hit", "in_prefix_hit"))] + [
            c for c in ("valid_hr10", "valid_hr10_JustForYou") if c in val]:
        b.plot(val["step"], val[col], "o-", label=col)
    b.set_xlabel("SFT step")
    b.set_ylim(0, 1)
    b.legend(frameon=False, fontsize=8)
    if "wall_s" in val:
        top = b.secondary_xaxis("top")
        top.set_xticks(val["step"].to_numpy(), [f"{w:.0f}s" for w in val["wall_s"]], fontsize=7)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
