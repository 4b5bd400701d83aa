"""Figures of training and comparison records: loss curves and the side-by-side comparison."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

__all__ = ["comparison_figure", "loss_curves"]


def loss_curves(losses: Sequence[float], epochs: Sequence = (), steps_per_epoch: int | None = None) -> Figure:
    """Training ELBO per step (light) with a moving average, and the test ELBO per epoch (with ± 1 SE)."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    elbo = -np.asarray(losses, dtype=np.float64)
    if elbo.size:
        ax.plot(np.arange(1, elbo.size + 1), elbo, color="C0", alpha=0.3, lw=0.8, label="train ELBO (per step)")
        window = max(1, elbo.size // 50)
        if window > 1:
            smooth = np.convolve(elbo, np.ones(window) / window, mode="valid")
            ax.plot(np.arange(window, elbo.size + 1), smooth, color="C0", lw=1.5, label=f"moving average ({window})")
        lo, hi = np.percentile(elbo, [5, 100])
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    if epochs:
        steps = [e.step for e in epochs]
        mean = np.array([e.test_elbo.mean for e in epochs])
        se = np.array([e.test_elbo.se for e in epochs])
        ax.errorbar(steps, mean, yerr=se, color="C1", marker="o", ms=3, label="test ELBO ± SE (per epoch)")
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO (nats per image)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def comparison_figure(result) -> Figure:
    """Three panels from a :class:`~pyro_vae.compare.CompareResult`: test ELBO (mean ± SE over seeds, each seed as a
    dot) and, when measured, the importance-sampled bound -NLL on log p(x) beside it; median seconds per epoch (with
    the ratio to ``mvn_diag`` above each bar); and peak resident-set growth."""
    rows = result.rows
    names = [row.guide for row in rows]
    positions = np.arange(len(rows))
    fig = Figure(figsize=(max(8.0, 1.6 * len(rows) * 1.5), 3.8), layout="constrained")
    ax_elbo, ax_time, ax_mem = fig.subplots(1, 3)
    means = np.array([row.test_elbo.mean for row in rows])
    ses = np.nan_to_num(np.array([row.test_elbo.se for row in rows]))
    ax_elbo.errorbar(positions, means, yerr=ses, fmt="o", color="C0", capsize=4, label="test ELBO, mean ± SE")
    seed_label = "test ELBO, each seed"  # one legend entry for the dots of every row: the first row that has some
    for i, guide in enumerate(names):
        seeds = [run.test_elbo.mean for run in result.runs if run.guide == guide]
        if seeds:
            ax_elbo.scatter(np.full(len(seeds), i + 0.15), seeds, s=10, color="C1", alpha=0.7, label=seed_label)
            seed_label = None
    if getattr(result, "nll_k", None) is not None:
        bound = np.array([np.nan if row.nll is None else -row.nll.mean for row in rows])
        bound_se = np.nan_to_num(np.array([np.nan if row.nll is None else row.nll.se for row in rows]))
        ax_elbo.errorbar(
            positions - 0.15, bound, yerr=bound_se, fmt="s", color="C3", capsize=4, label=f"-IS-NLL, k={result.nll_k}"
        )
    ax_elbo.legend(loc="lower left", fontsize=8)
    ax_elbo.set_ylabel("nats per image")
    ax_elbo.set_title("bounds on log p(x) (higher is better)")
    seconds = [row.seconds_per_epoch for row in rows]
    bars = ax_time.bar(positions, seconds, color="C2")
    for bar, row in zip(bars, rows, strict=True):
        if row.time_ratio is not None:
            ax_time.annotate(
                f"{row.time_ratio:.2f}×",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax_time.set_ylabel("seconds per epoch (median)")
    ax_time.set_title("training time")
    memory = [np.nan if row.peak_memory_mib is None else row.peak_memory_mib for row in rows]
    ax_mem.bar(positions, memory, color="C4")
    ax_mem.set_ylabel("peak RSS growth (MiB)")
    ax_mem.set_title("memory")
    for ax in (ax_elbo, ax_time, ax_mem):
        ax.set_xticks(positions, names, rotation=30, ha="right")
        ax.grid(alpha=0.3, axis="y")
    return fig
