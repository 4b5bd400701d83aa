"""Data-parallel throughput: ``pyro-vae train`` in 1 process against 2 processes under ``torchrun``.

Each configuration trains the seed VAE on the embedded data for a fixed number of steps per process, with one
torch thread per process, and reports images per second (global: processes × local batch × steps / wall time of
the training loop, read from ``metrics.jsonl``'s per-epoch seconds). On a 2-core CPU this is a check of the
overhead of DistributedDataParallel and gloo, not a speed-up: two processes share the same two cores that one
process with two threads would use. On a machine with GPUs, pass ``--device cuda`` and ``--nproc N``.

Run ``python benchmarks/distributed_speed.py``; ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(nproc: int, epochs: int, batch: int, n_train: int, device: str, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        train = ["-m", "pyro_vae", "train", "--out", str(out), "--epochs", str(epochs), "--batch-size", str(batch),
                 "--n-train", str(n_train), "--n-test", "500", "--device", device, "--threads", str(threads),
                 "--no-figures"]  # fmt: skip
        if nproc == 1:
            cmd = [sys.executable, *train]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *train]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_per_epoch = records[0]["step"]
    # The first epoch includes warm-up (Pyro validation, lazy imports); report the median of the others.
    seconds = [r["seconds"] for r in records[1:]] or [records[0]["seconds"]]
    per_epoch = statistics.median(seconds)
    images = nproc * batch * steps_per_epoch
    return {"images_per_s": images / per_epoch, "steps": steps_per_epoch, "elbo": records[-1]["test_elbo"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (CI): numbers are not meaningful")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--nproc", type=int, default=2, help="processes of the parallel run")
    parser.add_argument("--batch", type=int, default=128, help="local batch per process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args(argv)
    epochs, n_train = (2, 1024) if args.quick else (4, 10000)
    print(f"# distributed_speed: {epochs} epochs on {n_train} embedded images, local batch {args.batch}, "
          f"{args.threads} thread(s) per process, device {args.device}")  # fmt: skip
    print("| processes | global batch | steps/epoch | images/s | ratio to 1 process | final test ELBO |")
    print("|---|---|---|---|---|---|")
    base = None
    for nproc in (1, args.nproc):
        r = run(nproc, epochs, args.batch, n_train, args.device, args.threads)
        base = base or r["images_per_s"]
        print(f"| {nproc} | {nproc * args.batch} | {r['steps']} | {r['images_per_s']:.0f} | "
              f"{r['images_per_s'] / base:.2f} | {r['elbo']:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
