"""The records of :func:`pyro_vae.compare.compare` and their tables: plain text, Markdown and CSV.

:class:`SeedRun` is one (value, seed) run; :func:`summarise` turns the runs into one :class:`CompareRow` per value
(mean ± standard error over seeds from :mod:`pyro_vae.stats`, the median seconds per epoch, the largest peak
memory, the runs timed under load); :class:`CompareResult` holds both and formats them. Nothing here trains or
measures, so a saved comparison can be re-tabulated without torch doing any work.
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

__all__ = ["REFERENCE_GUIDE", "CompareResult", "CompareRow", "SeedRun", "summarise", "under_load"]

#: The family that the time ratio is measured against when guides are compared (the guide's default).
REFERENCE_GUIDE = "mvn_diag"
#: The mark on a timing taken while the machine was busy (see :func:`under_load`).
LOAD_MARK = "*"


def under_load(load: float | None, cpus: int | None) -> bool:
    """Whether a 1-minute load average ``load`` (runnable threads, this process's included) means that threads
    competed for the ``cpus`` CPUs: more were runnable than there are CPUs. Unknown load or CPUs is not flagged."""
    return load is not None and cpus is not None and load > cpus


class SeedRun(NamedTuple):
    """One training run of one value with one seed.

    :ivar variant: the value of the option compared, e.g. the family spec ``"low_rank:4"``.
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
    :ivar shared_weights: trainable numbers that start equal to the first value's initial VAE (same name, shape and
        values), or ``None`` when not measured.
    :ivar load_before: the machine's 1-minute load average before the run (``None``: not available).
    :ivar load_after: the same after the run.
    :ivar accuracy: M2's test accuracy of q(y | x) after the last epoch; ``None`` for the other models.
    """

    variant: str
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
    shared_weights: int | None = None
    load_before: float | None = None
    load_after: float | None = None
    accuracy: float | None = None

    @property
    def guide(self) -> str:
        """The value compared (the name from when only guides were compared; figures read it)."""
        return self.variant

    def loaded(self, cpus: int | None) -> bool:
        """Whether the run was timed under load on a machine of ``cpus`` CPUs (:func:`under_load` before or after)."""
        return under_load(self.load_before, cpus) or under_load(self.load_after, cpus)


class CompareRow(NamedTuple):
    """One value's line of the comparison table.

    :ivar variant: the value compared, e.g. a family spec.
    :ivar num_params: raw width per data point.
    :ivar num_weights: trainable numbers in the VAE.
    :ivar test_elbo: test ELBO, mean over seeds ± standard error over seeds (``se`` is NaN with one seed).
    :ivar seconds_per_epoch: median training seconds per epoch over all epochs of all seeds.
    :ivar time_ratio: ``seconds_per_epoch`` over the reference value's (``None`` when it was not compared).
    :ivar peak_memory_mib: largest resident-set growth over the seeds, or ``None`` where it cannot be measured.
    :ivar seeds: number of seeds.
    :ivar nll: IS-NLL, mean over seeds ± standard error over seeds, or ``None`` when not evaluated.
    :ivar diverged: runs that stopped on a non-finite loss or gradient; the statistics above cover the others.
    :ivar loaded: runs timed while the machine was busy (their seconds enter ``seconds_per_epoch``).
    :ivar time_loaded: whether ``time_ratio`` rests on a run timed under load, this value's or the reference's.
    :ivar accuracy: M2's test accuracy, mean over seeds ± standard error over seeds; ``None`` for the other models.
    """

    variant: str
    num_params: int
    num_weights: int
    test_elbo: MeanSE
    seconds_per_epoch: float
    time_ratio: float | None
    peak_memory_mib: float | None
    seeds: int
    nll: MeanSE | None = None
    diverged: int = 0
    loaded: int = 0
    time_loaded: bool = False
    accuracy: MeanSE | None = None

    @property
    def guide(self) -> str:
        """The value compared (the name from when only guides were compared; figures read it)."""
        return self.variant


_HEADER = ("guide", "raw width", "weights", "test ELBO (nats)", "s/epoch", "× reference", "peak RSS (MiB)")
_NLL_HEADER = "IS-NLL (nats)"


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _model_words(model) -> str:
    """The model, where it is not the VAE: a CVAE's ELBO and NLL are of log p(x | y)."""
    if model.kind == "vae":
        return ""
    bound = "; ELBO and IS-NLL of log p(x | y)" if model.kind == "cvae" else ""
    return f"--model {model.kind} with {model.num_classes} classes{bound}; "


def _csv_mean_se(value: MeanSE | None) -> tuple[str, str]:
    return ("", "") if value is None else (repr(value.mean), repr(value.se))


def _fmt_accuracy(value: MeanSE | None) -> str:
    if value is None or math.isnan(value.mean):
        return "n/a"
    return f"{value.mean:.3f} ± {_fmt(value.se, '.3f')}"


def _fmt_mean_se(value: MeanSE | None) -> str:
    if value is None or math.isnan(value.mean):
        return "n/a"
    return f"{value.mean:.2f} ± {_fmt(value.se, '.2f')}"


class CompareResult(NamedTuple):
    """The outcome of :func:`compare`: one :class:`CompareRow` per value, in the order given, and every run.

    :ivar rows: the table.
    :ivar runs: the (value, seed) runs behind it.
    :ivar config: the run configuration shared by every run (the compared field and the train seed are per run).
    :ivar dataset: the data set's name.
    :ivar isolated: whether each run had its own process.
    :ivar nll_k: particles of the IS-NLL, or ``None`` when it was not evaluated.
    :ivar field: the option compared (``"guide"``, ``"likelihood"``, ...).
    :ivar cpus: the machine's CPUs (``os.cpu_count()``), against which the load is judged.
    :ivar reference: the value the time ratio is taken against (default :data:`REFERENCE_GUIDE`).
    """

    rows: list[CompareRow]
    runs: list[SeedRun]
    config: RunConfig
    dataset: str
    isolated: bool
    nll_k: int | None = None
    field: str = "guide"
    cpus: int | None = None
    reference: str = REFERENCE_GUIDE

    def _has_accuracy(self) -> bool:
        return any(row.accuracy is not None for row in self.rows)

    def _header(self) -> tuple[str, ...]:
        header = (self.field, *_HEADER[1:5], f"× {self.reference}", *_HEADER[6:])
        extra = (() if self.nll_k is None else (f"IS-NLL k={self.nll_k} (nats)",)) + (
            ("accuracy q(y|x)",) if self._has_accuracy() else ()
        )
        return (*header[:4], *extra, *header[4:])

    def _cells(self) -> list[tuple[str, ...]]:
        cells = []
        for row in self.rows:
            nll = () if self.nll_k is None else (_fmt_mean_se(row.nll),)
            if self._has_accuracy():
                nll += (_fmt_accuracy(row.accuracy),)
            diverged = f" ({row.diverged} of {row.seeds} runs diverged)" if row.diverged else ""
            cells.append(
                (
                    row.guide,
                    str(row.num_params),
                    str(row.num_weights),
                    _fmt_mean_se(row.test_elbo) + diverged,
                    *nll,
                    _fmt(row.seconds_per_epoch, ".2f") + (f" {LOAD_MARK}" if row.loaded else ""),
                    _fmt(row.time_ratio, ".2f") + (f" {LOAD_MARK}" if row.time_loaded else ""),
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
            f"{self.field} compared; {self.dataset}, binarize={dc.binarize}; {_model_words(mc)}L={mc.latent_dim}, "
            f"hidden {','.join(map(str, mc.hidden_dims))}, "
            f"{mc.likelihood} likelihood; {tc.epochs} epochs of batch {tc.batch_size}"
            f"{'' if tc.max_steps is None else f' (at most {tc.max_steps} steps)'}, AdamW lr {tc.lr:g}, "
            f"objective {tc.objective} with {tc.num_particles} particle(s); seeds {seeds}; "
            f"{'one process per run' if self.isolated else 'all runs in one process'}, "
            f"{tc.threads if tc.threads is not None else torch.get_num_threads()} torch thread(s). "
            "Test ELBO after the last epoch: mean over seeds ± standard error over seeds"
            f"{nll}"
            ". s/epoch: median training "
            f"time of an epoch (SVI steps, no evaluation) over all epochs and seeds; × {self.reference}: its ratio "
            f"to {self.reference}'s. Peak RSS: growth of the resident set during a run (VmHWM after a reset, minus "
            "RSS at the start), the largest over seeds. Raw width: encoder outputs per image; weights: trainable "
            f"numbers of the VAE. {self._load_note()}{self._sharing_note()}"
        )

    def _load_note(self) -> str:
        """What the machine's load says about the timings."""
        if self.cpus is None or all(run.load_before is None and run.load_after is None for run in self.runs):
            return "The machine's load was not measured: compare timings only from an otherwise idle machine."
        loaded = sum(run.loaded(self.cpus) for run in self.runs)
        if not loaded:
            return f"The 1-minute load average stayed at or below the machine's {self.cpus} CPUs around every run."
        return (
            f"{LOAD_MARK}: timed while the 1-minute load average exceeded the machine's {self.cpus} CPUs ({loaded} of "
            f"{len(self.runs)} runs): threads competed for the CPUs, so these seconds and ratios do not compare the "
            "values; rerun on an idle machine (or with --threads 1 and fewer other jobs)."
        )

    def _sharing_note(self) -> str:
        """Which values start from none of the first value's initial weights."""
        first = self.rows[0].variant if self.rows else ""
        alone = [row.variant for row in self.rows[1:] if self._shares_nothing(row.variant)]
        if not alone:
            return ""
        return f" No initial weights shared with {first} (shapes or names differ): {', '.join(alone)}."

    def _shares_nothing(self, variant: str) -> bool:
        counts = [run.shared_weights for run in self.runs if run.variant == variant]
        return bool(counts) and all(count == 0 for count in counts)

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
        titles = {"guide": "Guide families", "prior": "Priors", "likelihood": "Likelihoods", "network": "Networks"}
        lines = [f"# {titles.get(self.field, self.field.capitalize() + 's')} compared", "", self.protocol(), ""]
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
                self.field,
                "num_params",
                "num_weights",
                "test_elbo_mean",
                "test_elbo_se",
                "seeds",
                "seconds_per_epoch_median",
                f"time_ratio_to_{self.reference}",
                "peak_rss_growth_mib",
                "nll_k",
                "nll_mean",
                "nll_se",
                "diverged",
                "runs_under_load",
                *(("accuracy_mean", "accuracy_se") if self._has_accuracy() else ()),
            ]
        )
        for row in self.rows:
            writer.writerow(
                [
                    row.variant,
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
                    row.loaded,
                    *(() if not self._has_accuracy() else _csv_mean_se(row.accuracy)),
                ]
            )
        return out.getvalue()

    def runs_csv(self) -> str:
        """Every (family, seed) run as CSV."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(
            [
                self.field,
                "seed",
                "test_elbo",
                "test_elbo_se",
                "median_epoch_seconds",
                "peak_rss_growth_mib",
                "nll",
                "nll_se",
                "nll_seconds",
                "failure",
                "shared_weights",
                "load_before",
                "load_after",
                "under_load",
            ]
        )
        for run in self.runs:
            writer.writerow(
                [
                    run.variant,
                    run.seed,
                    repr(run.test_elbo.mean),
                    repr(run.test_elbo.se),
                    repr(statistics.median(run.epoch_seconds)) if run.epoch_seconds else "",
                    "" if run.peak_memory_mib is None else repr(run.peak_memory_mib),
                    "" if run.nll is None else repr(run.nll.mean),
                    "" if run.nll is None else repr(run.nll.se),
                    "" if run.nll_seconds is None else repr(run.nll_seconds),
                    run.failure or "",
                    "" if run.shared_weights is None else run.shared_weights,
                    "" if run.load_before is None else repr(run.load_before),
                    "" if run.load_after is None else repr(run.load_after),
                    int(run.loaded(self.cpus)),
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


def summarise(
    values: Sequence[str], runs: Sequence[SeedRun], reference: str = REFERENCE_GUIDE, cpus: int | None = None
) -> list[CompareRow]:
    """One :class:`CompareRow` per value, in the order of ``values``, from its runs.

    Diverged runs (``failure`` set) are counted but left out of every statistic. The test ELBO and the IS-NLL are
    :func:`pyro_vae.stats.mean_se` over the seeds' means (``se`` NaN with one seed, both NaN with none). The time
    ratio is taken against ``reference`` when it was compared; runs timed under load on ``cpus`` CPUs are counted,
    and a ratio that rests on one (the row's or the reference's) is flagged.
    """
    rows = []
    for value in values:
        everyone = [run for run in runs if run.variant == value]
        mine = [run for run in everyone if run.failure is None]
        seconds = [s for run in mine for s in run.epoch_seconds]
        memory = [run.peak_memory_mib for run in mine if run.peak_memory_mib is not None]
        nlls = [run.nll.mean for run in mine if run.nll is not None]
        accuracies = [run.accuracy for run in mine if run.accuracy is not None]
        rows.append(
            CompareRow(
                variant=value,
                num_params=everyone[0].num_params,
                num_weights=everyone[0].num_weights,
                test_elbo=mean_se([run.test_elbo.mean for run in mine]),
                seconds_per_epoch=statistics.median(seconds) if seconds else math.nan,
                time_ratio=None,
                peak_memory_mib=max(memory) if memory else None,
                seeds=len(everyone),
                nll=mean_se(nlls) if nlls else None,
                diverged=len(everyone) - len(mine),
                loaded=sum(run.loaded(cpus) for run in mine),
                accuracy=mean_se(accuracies) if accuracies else None,
            )
        )
    ref = next((row for row in rows if row.variant == reference), None)
    if ref is not None:
        rows = [
            row._replace(
                time_ratio=row.seconds_per_epoch / ref.seconds_per_epoch, time_loaded=bool(row.loaded or ref.loaded)
            )
            for row in rows
        ]
    return rows
