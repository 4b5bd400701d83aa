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

from pyro_vae.cli.flags import config_from_args
from pyro_vae.config import RunConfig
from pyro_vae.errors import ConfigError

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
    from pyro_vae.priors import make_prior
    from pyro_vae.schedules import make_schedule

    make_schedule(config.train.kl_schedule)  # its values (linear:0, ...) are refused here, before any data load
    make_prior(config.model.prior, config.model.latent_dim)  # likewise the prior's K (mog:0, vamp:x, standard:3)
    if args.out is None and _under_torchrun():
        raise ConfigError("under torchrun pass --out DIR: every process must name the same run directory")
    if args.out is None:
        from pyro_vae.checkpoint import safe_name

        # The guide spec's options come from the user ("low_rank:../x" passes the family check): keep the derived
        # name a plain component of runs/.
        name = f"{config.model.guide.replace(':', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
        out = Path("runs") / safe_name(name.replace("/", "-"), what="run name")
    else:
        out = args.out
    if _torchrun_rank() == 0:  # the other ranks would find rank 0's fresh files; only rank 0 writes anyway
        from pyro_vae.run_dir import RunDir

        RunDir(out).check("overwrite" if args.overwrite else "new")
    return out, None, config


def cmd_train(args: argparse.Namespace) -> int:
    out, resume, config = _train_target(args)
    import pyro
    import torch

    from pyro_vae.data import load_dataset
    from pyro_vae.model import VAE
    from pyro_vae.train import TrainingInterrupted, fit

    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)
    data = load_dataset(config.data)
    pyro.set_rng_seed(config.train.seed)
    vae = VAE.from_config(config.model, data.input_dim, data.image_shape)
    logger.info(
        "training %s (L=%d) on %s: %d train / %d test images, %d epochs of batch %d",
        config.model.guide,
        config.model.latent_dim,
        data.name,
        data.x_train.shape[0],
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
    elbo = result.test_elbo
    print(f"test ELBO {elbo} nats/image after {result.steps} steps in {seconds:.1f} s; run directory: {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from pyro_vae.evaluation import evaluate
    from pyro_vae.run_dir import RunDir, load_run

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run = load_run(args.run_dir)
    x_test = run.test_images(args.n)  # the run's own data: their fingerprint is checked
    result = evaluate(run.vae, x_test, args.k, protocol=run.protocol(), chunk_size=args.chunk_size, seed=args.seed)
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
    from pyro_vae.plotting import sample_grid
    from pyro_vae.run_dir import RunDir, load_run

    if args.out.suffix.lower() != ".png":
        raise ConfigError(f"--out must be a .png file, got {args.out}")
    run = load_run(args.run_dir)
    fig = sample_grid(run.vae, run.state.image_shape, n=args.n, seed=args.seed)
    RunDir(args.out.parent).write_figure(args.out.name, fig)
    print(f"wrote {args.n} samples to {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    out = args.out or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    from pyro_vae.compare import compare

    seeds = list(range(args.seeds))
    start = time.perf_counter()
    result = compare(
        args.guides,
        config,
        seeds,
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
    print(f"\n{len(result.runs)} runs in {seconds:.0f} s; compare.md, compare.csv, runs.csv in {out}")
    return 0
