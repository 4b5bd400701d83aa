"""M2 and the CVAE under torchrun: a two-process step equals a one-process step on the same images.

M2's step runs the encoder twice (on the unlabelled images, every class enumerated, and on the labelled ones) and its
classifier in both programs; DistributedDataParallel must still average each parameter's whole gradient once.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

# One SGD step of M2 on the same images with 1 and with 2 processes. The guide's noise is fixed per image (and per
# enumerated class), read from a table by the number of rows the family sees, so both runs draw the same z.
WORKER = textwrap.dedent(
    """
    import sys, pyro, torch
    import pyro.distributions as dist
    from pyro.infer import SVI
    from pyro_vae.distributed import context_from_env, init, shutdown, unwrap, wrap
    from pyro_vae.guides.gaussian import MVNDiag
    from pyro_vae.labelled import SSVAE, LabelledPart
    from pyro_vae.objectives import make_objective
    from pyro_vae.optim import SingleOptimizer

    class FixedNoise(dist.Normal):
        table = {}  # rows -> (rows, L) noise, set per step by the harness
        def rsample(self, sample_shape=torch.Size()):
            return self.loc + self.scale * FixedNoise.table[self.loc.shape[0]]

    class FixedNoiseFamily(MVNDiag):
        def forward(self, raw, context=None):
            loc, scale = self.split(raw)
            return FixedNoise(loc, scale).to_event(1)

    torch.set_num_threads(1)
    ctx = context_from_env("cpu")
    world, rank = (ctx.world_size, ctx.rank) if ctx else (1, 0)
    if ctx:
        init(ctx)
    N_U, N_L, D, L, C, B, B_L = 64, 16, 12, 3, 3, 16, 8
    g = torch.Generator().manual_seed(0)
    x_u = torch.bernoulli(torch.full((N_U, D), 0.4), generator=g)
    x_l = torch.bernoulli(torch.full((N_L, D), 0.4), generator=g)
    y_l = torch.randint(0, C, (N_L,), generator=g)
    noise_u = torch.randn(N_U, C, L, generator=g)
    noise_l = torch.randn(N_L, L, generator=g)
    local = torch.arange(B)[rank::world]
    local_l = torch.arange(B_L)[rank::world]
    torch.manual_seed(1 + rank)  # different weights per rank: DDP must broadcast rank 0's
    m2 = SSVAE(D, C, latent_dim=L, hidden_dims=(8, 4), guide=FixedNoiseFamily(L), aux_weight=2.0)
    if ctx:
        wrap(m2, ctx)
    # enumerated rows are (class, image), flattened class-major
    FixedNoise.table = {C * len(local): noise_u[local].transpose(0, 1).reshape(-1, L), len(local_l): noise_l[local_l]}
    svi = SVI(m2.model, m2.guide, SingleOptimizer(torch.optim.SGD, {"lr": 0.01}), make_objective(enumerate=True))
    svi.step(x_u[local], N_U, local, labelled=LabelledPart(x_l[local_l], y_l[local_l], N_L, local_l))
    if rank == 0:
        torch.save(m2.state_dict(), sys.argv[1])
    if ctx:
        unwrap(m2)
        shutdown()
    """
)


def run_worker(tmp_path, nproc, out):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), str(out)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.slow
def test_two_process_m2_step_equals_one_process_step(tmp_path):
    """Each rank scales its unlabelled and labelled shares by N_u / (B/2) and N_l / (B_l/2); DDP averages the two
    gradients, which gives the one-process gradient over all images. With SGD, equal gradients give equal weights
    (float32 sums in another order: rtol 1e-5)."""
    one = run_worker(tmp_path, 1, tmp_path / "one.pt")
    two = run_worker(tmp_path, 2, tmp_path / "two.pt")
    assert one.keys() == two.keys()
    assert any(key.startswith("classifier.") for key in one)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
