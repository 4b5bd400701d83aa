"""The records of :func:`pyro_vae.compare.compare` and their tables: plain text, Markdown and CSV.

:class:`SeedRun` is one (family, seed) run; :func:`summarise` turns the runs into one :class:`CompareRow` per family
(mean ± standard error over seeds from :mod:`pyro_vae.stats`, the median seconds per epoch, the largest peak
memory); :class:`CompareResult` holds both and formats them. Nothing here trains or measures, so a saved comparison
can be re-tabulated without torch doing any work.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from pyro_vae.checkpoint import atomic_write_bytes
from pyro_vae.config import RunConfig
from pyro_vae.stats import MeanSE, mean_se

__all__ = ["REFERENCE_GUIDE", "CompareResult", "CompareRow", "SeedRun", "summarise"]

#: The family that the time ratio is measured against.
REFERENCE_GUIDE = "mvn_diag"


class SeedRun(NamedTuple):
    """One training run of one family with one seed.

    :ivar guide: the family spec, e.g. ``"low_rank:4"``.
    :ivar seed: the run's seed.
    :ivar test_elbo: test ELBO after the last epoch, mean over test images ± standard error.
    :ivar epoch_seconds: training seconds of each epoch.
    :ivar peak_memory_mib: resident-set growth during the run (see the module docstring), or ``None``.
    :ivar num_params: the family's raw width (the encoder head's output width).
    :ivar num_weights: trainable numbers in the VAE (encoder, decoder, family).
    :ivar steps: optimiser steps taken.
    :ivar dataset: the data set's name.
    :ivar nll: importance-sampled NLL after the last epoch, mean over test images ± standard error (``None`` when
        not evaluated).
    :ivar nll_seconds: seconds the NLL evaluation took (``None`` when not evaluated).
    :ivar nll_images: test images the NLL was estimated on.
    :ivar failure: ``None`` for a completed run; for a run that diverged (a non-finite loss or gradient, see
        :class:`~pyro_vae.errors.NonFiniteLossError`), the error message, and then ``test_elbo`` is NaN.
    """

    guide: str
    seed: int
    test_elbo: MeanSE
    epoch_seconds: tuple[float, ...]
    peak_memory_mib: float | None
    num_params: int
    num_weights: int
    steps: int
    dataset: str
    nll: MeanSE | None = None
    nll_seconds: float | None = None
    nll_images: int | None = None
    failure: str | None = None


class CompareRow(NamedTuple):
    """One family's line of the comparison table.

    :ivar guide: the family spec.
    :ivar num_params: raw width per data point.
    :ivar num_weights: trainable numbers in the VAE.
    :ivar test_elbo: test ELBO, mean over seeds ± standard error over seeds (``se`` is NaN with one seed).
    :ivar seconds_per_epoch: median training seconds per epoch over all epochs of all seeds.
    :ivar time_ratio: ``seconds_per_epoch`` over the reference family's (``None`` when it was not compared).
    :ivar peak_memory_mib: largest resident-set growth over the seeds, or ``None`` where it cannot be measured.
    :ivar seeds: number of seeds.
    :ivar nll: IS-NLL, mean over seeds ± standard error over seeds, or ``None`` when not evaluated.
    :ivar diverged: runs that stopped on a non-finite loss or gradient; the statistics above cover the others.
    """

    guide: str
    num_params: int
    num_weights: int
    test_elbo: MeanSE
    seconds_per_epoch: float
    time_ratio: float | None
    peak_memory_mib: float | None
    seeds: int
    nll: MeanSE | None = None
    diverged: int = 0


_HEADER = ("guide", "raw width", "weights", "test ELBO (nats)", "s/epoch", f"× {REFERENCE_GUIDE}", "peak RSS (MiB)")
_NLL_HEADER = "IS-NLL (nats)"


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _fmt_mean_se(value: MeanSE | None) -> str:
    if value is None or math.isnan(value.mean):
        return "n/a"
    return f"{value.mean:.2f} ± {_fmt(value.se, '.2f')}"


class CompareResult(NamedTuple):
    """The outcome of :func:`compare`: one :class:`CompareRow` per family, in the order given, and every run.

    :ivar rows: the table.
    :ivar runs: the (family, seed) runs behind it.
    :ivar config: the run configuration shared by every run (its model guide and train seed are per run).
    :ivar dataset: the data set's name.
    :ivar isolated: whether each run had its own process.
    :ivar nll_k: particles of the IS-NLL, or ``None`` when it was not evaluated.
    """

    rows: list[CompareRow]
    runs: list[SeedRun]
    config: RunConfig
    dataset: str
    isolated: bool
    nll_k: int | None = None

    def _header(self) -> tuple[str, ...]:
        if self.nll_k is None:
            return _HEADER
        return (*_HEADER[:4], f"IS-NLL k={self.nll_k} (nats)", *_HEADER[4:])

    def _cells(self) -> list[tuple[str, ...]]:
        cells = []
        for row in self.rows:
            nll = () if self.nll_k is None else (_fmt_mean_se(row.nll),)
            diverged = f" ({row.diverged} of {row.seeds} runs diverged)" if row.diverged else ""
            cells.append(
                (
                    row.guide,
                    str(row.num_params),
                    str(row.num_weights),
                    _fmt_mean_se(row.test_elbo) + diverged,
                    *nll,
                    _fmt(row.seconds_per_epoch, ".2f"),
                    _fmt(row.time_ratio, ".2f"),
                    _fmt(row.peak_memory_mib, ".0f"),
                )
            )
        return cells

    def protocol(self) -> str:
        """One paragraph that says what was run and what the columns mean."""
        tc, mc, dc = self.config.train, self.config.model, self.config.data
        seeds = sorted({run.seed for run in self.runs})
        nll = (
            ""
            if self.nll_k is None
            else f"; IS-NLL: importance-weighted bound with k={self.nll_k} draws from q per image on the first "
            f"{self.runs[0].nll_images} test images, likewise"
        )
        return (
            f"{self.dataset}, binarize={dc.binarize}; L={mc.latent_dim}, hidden {','.join(map(str, mc.hidden_dims))}, "
            f"{mc.likelihood} likelihood; {tc.epochs} epochs of batch {tc.batch_size}"
            f"{'' if tc.max_steps is None else f' (at most {tc.max_steps} steps)'}, AdamW lr {tc.lr:g}, "
            f"objective {tc.objective} with {tc.num_particles} particle(s); seeds {seeds}; "
            f"{'one process per run' if self.isolated else 'all runs in one process'}, "
            f"{tc.threads if tc.threads is not None else torch.get_num_threads()} torch thread(s). "
            "Test ELBO after the last epoch: mean over seeds ± standard error over seeds"
            f"{nll}"
            ". s/epoch: median training "
            f"time of an epoch (SVI steps, no evaluation) over all epochs and seeds; × {REFERENCE_GUIDE}: its ratio "
            f"to {REFERENCE_GUIDE}'s. Peak RSS: growth of the resident set during a run (VmHWM after a reset, minus "
            "RSS at the start), the largest over seeds. Raw width: encoder outputs per image; weights: trainable "
            "numbers of the VAE."
        )

    def table(self) -> str:
        """The table as aligned plain text."""
        header = self._header()
        cells = [header, *self._cells()]
        widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
            for row in cells
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """A Markdown document: the protocol, then the table."""
        lines = ["# Guide families compared", "", self.protocol(), ""]
        header = self._header()
        lines.append("| " + " | ".join(header) + " |")
        lines.append("| --- | " + " | ".join("---:" for _ in header[1:]) + " |")
        lines += ["| " + " | ".join(cells) + " |" for cells in self._cells()]
        failed = [run for run in self.runs if run.failure is not None]
        if failed:
            lines += ["", "Runs that diverged (left out of the statistics):", ""]
            lines += [f"- {run.guide}, seed {run.seed}: {run.failure}" for run in failed]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """The table as CSV, with full precision."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(
            [
                "guide",
                "num_params",
                "num_weights",
                "test_elbo_mean",
                "test_elbo_se",
                "seeds",
                "seconds_per_epoch_median",
                f"time_ratio_to_{REFERENCE_GUIDE}",
                "peak_rss_growth_mib",
                "nll_k",
                "nll_mean",
                "nll_se",
                "diverged",
            ]
        )
        for row in self.rows:
            writer.writerow(
                [
                    row.guide,
                    row.num_params,
                    row.num_weights,
                    repr(row.test_elbo.mean),
                    repr(row.test_elbo.se),
                    row.seeds,
                    repr(row.seconds_per_epoch),
                    "" if row.time_ratio is None else repr(row.time_ratio),
                    "" if row.peak_memory_mib is None else repr(row.peak_memory_mib),
                    "" if self.nll_k is None else self.nll_k,
                    "" if row.nll is None else repr(row.nll.mean),
                    "" if row.nll is None else repr(row.nll.se),
                    row.diverged,
                ]
            )
        return out.getvalue()

    def runs_csv(self) -> str:
        """Every (family, seed) run as CSV."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(
            [
                "guide",
                "seed",
                "test_elbo",
                "test_elbo_se",
                "median_epoch_seconds",
                "peak_rss_growth_mib",
                "nll",
                "nll_se",
                "nll_seconds",
                "failure",
            ]
        )
        for run in self.runs:
            writer.writerow(
                [
                    run.guide,
                    run.seed,
                    repr(run.test_elbo.mean),
                    repr(run.test_elbo.se),
                    repr(statistics.median(run.epoch_seconds)) if run.epoch_seconds else "",
                    "" if run.peak_memory_mib is None else repr(run.peak_memory_mib),
                    "" if run.nll is None else repr(run.nll.mean),
                    "" if run.nll is None else repr(run.nll.se),
                    "" if run.nll_seconds is None else repr(run.nll_seconds),
                    run.failure or "",
                ]
            )
        return out.getvalue()

    def write(self, out_dir: str | Path) -> list[Path]:
        """Write ``compare.md``, ``compare.csv`` and ``runs.csv`` into ``out_dir`` (each atomically); returns the
        paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, text in (
            ("compare.md", self.to_markdown()),
            ("compare.csv", self.to_csv()),
            ("runs.csv", self.runs_csv()),
        ):
            path = out_dir / name
            atomic_write_bytes(path, lambda f, text=text: f.write(text.encode()))
            paths.append(path)
        return paths


def summarise(guides: Sequence[str], runs: Sequence[SeedRun]) -> list[CompareRow]:
    """One :class:`CompareRow` per family, in the order of ``guides``, from its runs.

    Diverged runs (``failure`` set) are counted but left out of every statistic. The test ELBO and the IS-NLL are
    :func:`pyro_vae.stats.mean_se` over the seeds' means (``se`` NaN with one seed, both NaN with none).
    """
    rows = []
    for guide in guides:
        everyone = [run for run in runs if run.guide == guide]
        mine = [run for run in everyone if run.failure is None]
        seconds = [s for run in mine for s in run.epoch_seconds]
        memory = [run.peak_memory_mib for run in mine if run.peak_memory_mib is not None]
        nlls = [run.nll.mean for run in mine if run.nll is not None]
        rows.append(
            CompareRow(
                guide=guide,
                num_params=everyone[0].num_params,
                num_weights=everyone[0].num_weights,
                test_elbo=mean_se([run.test_elbo.mean for run in mine]),
                seconds_per_epoch=statistics.median(seconds) if seconds else math.nan,
                time_ratio=None,
                peak_memory_mib=max(memory) if memory else None,
                seeds=len(everyone),
                nll=mean_se(nlls) if nlls else None,
                diverged=len(everyone) - len(mine),
            )
        )
    reference = next((row for row in rows if row.guide == REFERENCE_GUIDE), None)
    if reference is not None:
        rows = [row._replace(time_ratio=row.seconds_per_epoch / reference.seconds_per_epoch) for row in rows]
    return rows
