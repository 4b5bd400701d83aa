"""The commands of ``pyro-vae``: ``train``, ``evaluate``, ``sample`` and ``compare``.

Heavy imports (torch, Pyro, matplotlib) happen inside the commands, so ``pyro-vae --help`` answers at once. The
functions marked ``# run-dir: replaced by RunDir`` hold what :class:`pyro_vae.run_dir.RunDir`, ``read_run_config``
and ``load_run`` take over.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from pyro_vae.cli.flags import config_from_args
from pyro_vae.config import RunConfig
from pyro_vae.errors import ConfigError

logger = logging.getLogger(__name__)


# run-dir: replaced by RunDir
def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if any(part == ".." for part in out.parts) or "\0" in str(out):
        raise ConfigError(f"--out {str(out)!r} must not contain '..' or NUL")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if (out / "config.json").exists() and not overwrite:
        raise ConfigError(f"{out} already holds a run; pass --overwrite to replace it, or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create run directory {out}: {err.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"run directory {out} is not writable; choose another --out")


def _under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ or "RANK" in os.environ


def _torchrun_rank() -> int:
    """This process's rank under torchrun (0 outside it); a malformed RANK is reported by fit's own check."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


# run-dir: replaced by RunDir
def _check_run_dir(out: Path, overwrite: bool) -> None:
    """Refuse a bad or occupied ``--out`` before anything is loaded; :func:`pyro_vae.train.fit` creates it, after the
    data have been validated, so that a bad input leaves nothing behind."""
    if any(part == ".." for part in out.parts) or "\0" in str(out):
        raise ConfigError(f"--out {str(out)!r} must not contain '..' or NUL; give the run directory plainly")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory; choose another --out")
    if out.is_dir() and not overwrite and ((out / "config.json").exists() or any(out.glob("last*.pt"))):
        raise ConfigError(
            f"{out} already holds a run; pass --resume {out} to continue it, --overwrite to replace it, "
            "or choose another --out"
        )


# run-dir: replaced by RunDir (and read_run_config for the saved config)
def _resume_target(args: argparse.Namespace) -> tuple[Path, Path, RunConfig]:
    """``(run directory, checkpoint, saved config)`` for ``--resume DIR`` or ``--resume DIR/last.prev.pt``."""
    from pyro_vae.checkpoint import CheckpointDir, load_checkpoint

    target = args.resume
    if args.overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it; pass one of them")
    if target.is_dir():
        run_dir, checkpoint = target, CheckpointDir(target).latest()
        if checkpoint is None:
            raise ConfigError(
                f"--resume {target}: the directory holds no checkpoint; start the run with --out {target} --overwrite"
            )
    elif target.is_file():
        run_dir, checkpoint = target.parent, target
    else:
        raise ConfigError(f"--resume {target}: no such run directory or checkpoint file")
    if args.out is not None and args.out.resolve() != run_dir.resolve():
        raise ConfigError(f"--resume continues the run in {run_dir}; leave out --out {args.out}")
    return run_dir, checkpoint, RunConfig.from_dict(load_checkpoint(checkpoint)["config"])


def _train_target(args: argparse.Namespace) -> tuple[Path, Path | None, RunConfig]:
    """``(run directory, checkpoint to resume or None, config)``; every usage error is raised here, before any data
    are loaded."""
    if args.resume is not None:
        out, resume, saved = _resume_target(args)
        return out, resume, config_from_args(args, base=saved)
    if args.force_resume:
        raise ConfigError("--force-resume only applies with --resume DIR")
    config = config_from_args(args)
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
        _check_run_dir(out, args.overwrite)
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
    vae = VAE.from_config(config.model, data.input_dim)
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
            resume=resume if resume is not None else False,
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


# run-dir: replaced by load_run
def _load_run(run_dir: Path):
    from pyro_vae.checkpoint import CheckpointDir, load_checkpoint
    from pyro_vae.model import VAE

    checkpoint = CheckpointDir(run_dir).latest() if run_dir.is_dir() else None
    if checkpoint is None:
        raise ConfigError(f"{run_dir} holds no checkpoint (last.pt); pass a directory written by 'pyro-vae train'")
    payload = load_checkpoint(checkpoint)
    config = RunConfig.from_dict(payload["config"])
    vae = VAE.from_config(config.model, int(payload["input_dim"]))
    vae.load_state_dict(payload["model"])
    vae.eval()
    return config, vae, payload


def cmd_evaluate(args: argparse.Namespace) -> int:
    config, vae, _ = _load_run(args.run_dir)
    import torch

    from pyro_vae.data import binarize_eval, load_dataset
    from pyro_vae.evaluation import DataProtocol, evaluate

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = load_dataset(config.data)
    x_test = binarize_eval(data.x_test, config.data.binarize, config.train.seed, config.data.threshold)
    if args.n is not None:
        if args.n > x_test.shape[0]:
            available = x_test.shape[0]
            raise ConfigError(f"--n {args.n} exceeds the run's {available} test images; use --n {available} or less")
        x_test = x_test[: args.n]
    drawn = config.data.binarize in ("dynamic", "static")  # only Bernoulli draws have a seed
    protocol = DataProtocol(data.name, "test", config.data.binarize, config.train.seed if drawn else None)
    result = evaluate(vae, x_test, args.k, protocol=protocol, chunk_size=args.chunk_size, seed=args.seed)
    record = result.to_json()
    print(result.table())
    if args.gaps:
        from pyro_vae.gaps import inference_gaps

        gaps = inference_gaps(
            vae,
            x_test[: args.gap_images],
            k=max(args.k),
            steps=args.gap_steps,
            chunk_size=args.chunk_size,
            seed=args.seed,
        )
        record["gaps"] = gaps.to_json()
        print()
        print(gaps.table())
    out = args.out or args.run_dir / "eval.json"
    try:
        out.write_text(json.dumps(record, indent=2) + "\n")
    except OSError as err:
        raise ConfigError(f"cannot write {out}: {err.strerror}; pass another --out") from None
    print(f"wrote {out}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    _, vae, payload = _load_run(args.run_dir)
    from pyro_vae.plotting import sample_grid

    if args.out.suffix.lower() != ".png":
        raise ConfigError(f"--out must be a .png file, got {args.out}")
    fig = sample_grid(vae, payload.get("image_shape"), n=args.n, seed=args.seed)
    try:
        fig.savefig(args.out, dpi=100)
    except OSError as err:
        raise ConfigError(f"cannot write {args.out}: {err.strerror}") from None
    print(f"wrote {args.n} samples to {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    out = args.out or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    _prepare_out_dir(out, args.overwrite)

    from pyro_vae.compare import compare
    from pyro_vae.train import environment_info

    seeds = list(range(args.seeds))
    (out / "config.json").write_text(
        json.dumps(
            {"config": config.to_dict(), "guides": args.guides, "seeds": seeds, "environment": environment_info()},
            indent=2,
            sort_keys=True,
        )
        + "\n"
    )
    start = time.perf_counter()
    result = compare(
        args.guides,
        config,
        seeds,
        out_dir=out,
        isolate=args.isolate,
        nll_k=args.nll_k or None,
        nll_images=args.nll_images,
    )
    seconds = time.perf_counter() - start
    if not args.no_figures:
        from pyro_vae.plotting import comparison_figure

        comparison_figure(result).savefig(out / "compare.png", dpi=100)
    print(result.table())
    print(f"\n{result.protocol()}")
    print(f"\n{len(result.runs)} runs in {seconds:.0f} s; compare.md, compare.csv, runs.csv in {out}")
    return 0
