"""The commands of ``pyro-vae``: ``train``, ``evaluate``, ``sample`` and ``compare``.

Heavy imports (torch, Pyro, matplotlib) happen inside the commands, so ``pyro-vae --help`` answers at once. The
functions marked ``# run-dir: replaced by RunDir`` hold what :class:`pyro_vae.run_dir.RunDir`, ``read_run_config``
and ``load_run`` take over.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pyro_vae.cli.checks import check_before_load
from pyro_vae.cli.flags import config_from_args
from pyro_vae.config import RunConfig
from pyro_vae.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from pyro_vae.data import Dataset
    from pyro_vae.model import VAE

logger = logging.getLogger(__name__)


def _under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ or "RANK" in os.environ


def _torchrun_rank() -> int:
    """This process's rank under torchrun (0 outside it); a malformed RANK is reported by fit's own check."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _resume_target(args: argparse.Namespace) -> tuple[Path, Path | None, RunConfig]:
    """``(run directory, checkpoint or None for the newest, saved config)`` for ``--resume DIR`` or
    ``--resume DIR/last.prev.pt``; the directory is checked as :class:`~pyro_vae.run_dir.RunDir` will open it."""
    from pyro_vae.run_dir import RunDir, read_run_config

    target = args.resume
    if args.overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it; pass one of them")
    run_dir, checkpoint = (target.parent, target) if target.is_file() else (target, None)
    if args.out is not None and args.out.resolve() != run_dir.resolve():
        raise ConfigError(f"--resume continues the run in {run_dir}; leave out --out {args.out}")
    RunDir(run_dir).check("resume", checkpoint)
    return run_dir, checkpoint, read_run_config(run_dir)


def _train_target(args: argparse.Namespace) -> tuple[Path, Path | None, RunConfig]:
    """``(run directory, checkpoint to resume or None, config)``; every usage error is raised here, before any data
    are loaded."""
    if args.resume is not None:
        out, resume, saved = _resume_target(args)
        return out, resume, config_from_args(args, base=saved)
    if args.force_resume:
        raise ConfigError("--force-resume only applies with --resume DIR")
    config = config_from_args(args)
    hint = check_before_load(config, device=not _under_torchrun())
    if hint is not None:
        logger.warning(hint)
    if args.out is None and _under_torchrun():
        raise ConfigError("under torchrun pass --out DIR: every process must name the same run directory")
    if args.out is None:
        from pyro_vae.checkpoint import safe_name

        # The guide spec's options come from the user ("low_rank:../x" passes the family check): keep the derived
        # name a plain component of runs/.
        kind = "" if config.model.kind == "vae" else f"{config.model.kind}-"  # runs/m2-mvn_diag-<time>
        name = f"{kind}{config.model.guide.replace(':', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
        out = Path("runs") / safe_name(name.replace("/", "-"), what="run name")
    else:
        out = args.out
    if _torchrun_rank() == 0:  # the other ranks would find rank 0's fresh files; only rank 0 writes anyway
        from pyro_vae.run_dir import RunDir

        RunDir(out).check("overwrite" if args.overwrite else "new")
    return out, None, config


def build_for_data(config: RunConfig, data: Dataset) -> tuple[RunConfig, VAE]:
    """``(config, model)``: the model ``config.model.kind`` names (:func:`pyro_vae.labelled.build_model`), and the
    config with the data's number of classes recorded in it, so that ``config.json`` says which C the run has.

    :raises DataError: one line for ``--model cvae|m2`` on data without labels, or labels that are not ``0..C-1``
        (:func:`pyro_vae.data.num_classes`); nothing has been written yet.
    """
    from pyro_vae.data import num_classes
    from pyro_vae.labelled import build_model

    classes = None
    if config.model.kind != "vae":
        classes = num_classes(data, what=f"--model {config.model.kind}'s data")
        if config.model.num_classes is None:
            config = config.replace(model={"num_classes": classes})
    return config, build_model(config.model, data.input_dim, data.image_shape, classes)


def cmd_train(args: argparse.Namespace) -> int:
    out, resume, config = _train_target(args)
    import pyro
    import torch

    from pyro_vae.data import load_dataset
    from pyro_vae.train import TrainingInterrupted, fit

    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)
    data = load_dataset(config.data)
    pyro.set_rng_seed(config.train.seed)
    config, vae = build_for_data(config, data)
    logger.info(
        "training %s %s (L=%d) on %s: %d train%s / %d test images, %d epochs of batch %d",
        config.model.kind,
        config.model.guide,
        config.model.latent_dim,
        data.name,
        data.x_train.shape[0],
        "" if config.data.labelled is None else f" ({config.data.labelled} labelled)",
        data.x_test.shape[0],
        config.train.epochs,
        config.train.batch_size,
    )
    start = time.perf_counter()
    try:
        result = fit(
            vae,
            data,
            config,
            out_dir=out,
            resume=(resume or True) if args.resume is not None else False,
            overwrite=args.overwrite,
            force_resume=args.force_resume,
        )
    except TrainingInterrupted as err:
        print(f"pyro-vae: {err}", file=sys.stderr)
        return err.exit_code
    seconds = time.perf_counter() - start
    if _torchrun_rank() != 0:
        return 0  # rank 0 writes the figures and reports
    if not args.no_figures:
        from pyro_vae.plotting import save_run_figures

        save_run_figures(vae, data, result, out)
    elbo, accuracy = result.test_elbo, result.epochs[-1].accuracy if result.epochs else None
    conditional = " (of log p(x | y))" if config.model.kind == "cvae" else ""
    score = "" if accuracy is None else f", test accuracy of q(y|x) {accuracy:.4f}"
    print(
        f"test ELBO {elbo} nats/image{conditional}{score} after {result.steps} steps in {seconds:.1f} s; "
        f"run directory: {out}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from pyro_vae.labelled import class_count
    from pyro_vae.run_dir import RunDir, load_run

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from pyro_vae.progress import Progress

    run = load_run(args.run_dir)
    if args.gaps and class_count(run.vae) is not None:
        raise ConfigError(f"--gaps measures the inference gaps of a plain VAE; run {run.path} is a {run.vae.kind}")
    held_out = run.held_out(args.n)  # the run's own data: their fingerprint is checked
    x_test = held_out.x
    with Progress(x_test.shape[0], desc="evaluate", unit="images", logger=logger) as progress:
        # a model with labels is scored with the test labels (the CVAE's log p(x | y), M2's accuracy)
        result = run.evaluate_on(
            held_out, args.k, chunk_size=args.chunk_size, seed=args.seed, progress=progress.update
        )  # fmt: skip
    record = result.to_json()
    print(result.table())
    if args.gaps:
        from pyro_vae.gaps import inference_gaps

        gaps = inference_gaps(
            run.vae, x_test[: args.gap_images], k=max(args.k), steps=args.gap_steps, chunk_size=args.chunk_size,
            seed=args.seed,
        )  # fmt: skip
        record["gaps"] = gaps.to_json()
        print()
        print(gaps.table())
    out = args.out if args.out is not None else run.path / "eval.json"
    RunDir(out.parent).write_json(out.name, record)
    print(f"wrote {out}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from pyro_vae.cli.sampling import check_label, draw_samples, sample_bytes, sample_target, write_samples

    out, fmt = sample_target(args.run_dir, args.out, args.format, args.n, args.overwrite)  # before the run loads
    from pyro_vae.run_dir import load_run, read_run_config

    if args.label is not None:  # the saved config says the model and its classes: refused before any weights load
        model = read_run_config(args.run_dir).model
        check_label(args.label, model.kind, model.num_classes)
    run = load_run(args.run_dir)  # a reader: no lock, so a run that is training goes on
    samples = draw_samples(run.vae, args.n, seed=args.seed, draws=args.draws, label=args.label)
    written = write_samples(run.path, out, sample_bytes(samples, run.state.image_shape, fmt))
    of = "" if args.label is None else f" of class {args.label}"
    print(f"wrote {args.n} {'draws' if args.draws else 'decoder means'}{of} to {written}")
    return 0


def _compare_variants(args: argparse.Namespace) -> tuple[RunConfig, str, list[str]]:
    """The base config, and ``(field, values)`` of ``--vary`` or ``--guides`` (default: the guide list), each value's
    run config checked as ``train`` checks its own, before any data load; a field set by its own flag as well is
    refused. The base config holds the first value, so that it is a config some run will use: ``--vary
    likelihood=beta,gaussian --binarize none`` must not be refused for the default likelihood it never trains."""
    from pyro_vae.cli.parser import DEFAULT_COMPARE_GUIDES
    from pyro_vae.compare import vary_fields

    field, values = args.vary or ("guide", args.guides or DEFAULT_COMPARE_GUIDES.split(","))
    section = vary_fields()[field]
    if field != "guide" and getattr(args, field, None) is not None:
        raise ConfigError(f"--{field.replace('_', '-')} and --vary {field}=... both set the {field}; pass one of them")
    if getattr(args, field, None) is None:
        setattr(args, field, values[0])
    config = config_from_args(args)
    hints = [check_before_load(config.replace(**{section: {field: value}})) for value in values]
    for hint in dict.fromkeys(h for h in hints if h is not None):  # once each, in order
        logger.warning(hint)
    return config, field, values


def cmd_compare(args: argparse.Namespace) -> int:
    config, field, values = _compare_variants(args)
    out = args.out or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    from pyro_vae.compare import compare

    start = time.perf_counter()
    result = compare(
        values,
        config,
        list(range(args.seeds)),
        field=field,
        out_dir=out,
        isolate=args.isolate,
        nll_k=args.nll_k or None,
        nll_images=args.nll_images,
        overwrite=args.overwrite,
    )
    seconds = time.perf_counter() - start
    if not args.no_figures:
        from pyro_vae.plotting import comparison_figure
        from pyro_vae.run_dir import RunDir

        RunDir(out).write_figure("compare.png", comparison_figure(result))
    print(result.table())
    print(f"\n{result.protocol()}")
    nll = sum(run.nll_seconds or 0.0 for run in result.runs)
    print(
        f"\n{len(result.runs)} runs in {seconds:.0f} s ({nll:.0f} s of it the IS-NLL; --nll-k 0 skips it); "
        f"compare.md, compare.csv, runs.csv in {out}"
    )
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """``pyro-vae plot RUN --kind K``: one figure of a trained run, written atomically; without ``--out`` into
    ``RUN/plots/<kind>.png`` (listed in the run's files, so ``--overwrite`` of the run removes it)."""
    from pyro_vae.cli.parser import PLOT_SUFFIXES

    if args.out is not None and args.out.suffix.lower() not in PLOT_SUFFIXES:
        raise ConfigError(f"--out must end in one of {', '.join(PLOT_SUFFIXES)}, got {args.out}")
    from pyro_vae.plotting import run_figure
    from pyro_vae.run_dir import RunDir, load_run

    run = load_run(args.run_dir)  # a missing or damaged run is one line here, before any data are read
    fig = run_figure(run, args.kind, n=args.n, seed=args.seed, draws=args.draws)
    if args.out is None:
        out = RunDir(run.path).write_figure(f"plots/{args.kind}.png", fig)
    else:
        out = RunDir(args.out.parent).write_figure(args.out.name, fig)
    print(f"wrote {out}")
    return 0
