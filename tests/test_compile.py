"""The compiled step (pyro_vae/compile.py): the traced graph is Pyro's step, compiled and eager steps agree with the
same noise, the guard still refuses, and what cannot compile falls back with one log line.

Inductor compiles C++ on CPU (about a minute per graph on a loaded 2-core machine), so only the tests marked slow
compile; the others check the traced graph itself, which is what Inductor is handed.
"""

import logging

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_vae.compile import compile_step, trace_step
from pyro_vae.errors import NonFiniteLossError
from pyro_vae.guides import family_names
from pyro_vae.model import VAE
from pyro_vae.objectives import make_objective
from pyro_vae.optim import GuardedSVI, adamw
from pyro_vae.schedules import make_schedule

D, N, B = 12, 40, 8


def tiny_vae(guide="mvn_diag", seed=0):
    torch.manual_seed(seed)
    return VAE(D, latent_dim=2, hidden_dims=(8,), guide=guide)


def data(n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.rand(n, D, generator=g), generator=g)


def param_list(vae):
    return [p for _, p in sorted(vae.named_parameters())]


@pytest.mark.parametrize("family", family_names())
def test_traced_graph_is_the_pyro_step(family):
    """The graph make_fx records replays Pyro's own Trace_ELBO.loss_and_grads exactly, for every family, on a
    batch that is not the one it was traced on."""
    vae = tiny_vae(family)
    params = param_list(vae)
    x, index = data()[:B], torch.arange(3, 3 + B)
    elbo = Trace_ELBO()
    graph = trace_step(elbo, vae.model, vae.guide, params, torch.zeros(B, D), N, torch.arange(B))
    torch.manual_seed(7)
    with pyro.validation_enabled(False):
        eager_loss = elbo.loss_and_grads(vae.model, vae.guide, x, N, index)
    eager_grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    torch.manual_seed(7)
    with torch.no_grad():
        loss, grads = graph(params, x, index)
    # Same ATen ops in the same order on the same noise: the gradients are bit for bit Pyro's.
    for name, g, ge in zip(sorted(dict(vae.named_parameters())), grads, eager_grads, strict=True):
        assert ge is not None and torch.equal(g, ge), name
    # Pyro sums the sites' float32 log-densities after .item() in float64; the graph sums the same 3 terms in
    # float32: at most 3 roundings of 2**-24 relative each, and with log p(x|z) = O(D) dominating there is no
    # cancellation, so 4 * 2**-24 relative bounds the difference.
    assert loss.item() == pytest.approx(eager_loss, rel=4 * 2**-24)


def test_tracing_leaves_no_trace():
    """Tracing runs a real step, but restores the RNG and leaves no gradients behind."""
    vae = tiny_vae()
    before = torch.get_rng_state()
    step = compile_step(vae, Trace_ELBO(), adamw(), num_data=N, batch_size=B, device="cpu")
    assert step is not None
    assert torch.equal(torch.get_rng_state(), before)
    assert all(p.grad is None for p in vae.parameters())


@pytest.mark.parametrize(
    ("objective", "schedule", "expected"),
    [
        (
            "iwae:3:dreg",
            None,
            "the dreg estimator gives the encoder and the decoder two surrogates, so it has no single graph",
        ),
        ("trace", "linear:100", "a KL schedule's weight changes every step and would be frozen into the graph"),
    ],
)
def test_fallback_is_one_log_line(caplog, objective, schedule, expected):
    vae = tiny_vae()
    with caplog.at_level(logging.INFO, logger="pyro_vae.compile"):
        step = compile_step(
            vae,
            make_objective(objective),
            adamw(),
            num_data=N,
            batch_size=B,
            device="cpu",
            kl_schedule=make_schedule(schedule),
        )
    assert step is None
    assert [r.getMessage() for r in caplog.records] == [f"compile: falling back to the eager step: {expected}"]


def test_unlisted_objective_falls_back(caplog):
    class MyELBO(Trace_ELBO):  # a subclass may change the maths, so it is not assumed traceable
        pass

    with caplog.at_level(logging.INFO, logger="pyro_vae.compile"):
        step = compile_step(tiny_vae(), MyELBO(), adamw(), num_data=N, batch_size=B, device="cpu")
    assert step is None
    assert len(caplog.records) == 1
    assert "objective MyELBO has no traceable loss" in caplog.records[0].getMessage()


def run_steps(step, x, seeds, batch=B):
    losses = []
    for i, seed in enumerate(seeds):
        torch.manual_seed(seed)
        rows = torch.arange(i * batch, (i + 1) * batch, device=x.device) % x.shape[0]
        losses.append(step(x[rows], rows))
    return losses


@pytest.mark.slow
def test_compiled_and_eager_steps_agree():
    """50 compiled and 50 eager AdamW steps from the same initialisation with the same noise give the same losses.

    Tolerance: Inductor fuses the graph's reductions (matmuls, sums over sites and the batch) and may reassociate
    float32 sums, so each loss and gradient differs in its last bits (about 1e-7 relative; measured per step in
    test_traced_graph_is_the_pyro_step without fusion: 0). Adam normalises the gradient, so these differences move
    the parameters by at most about lr * 1e-7 / eps-relative per step and do not compound into chaos over 50 small
    steps; a relative 1e-4 on the losses leaves three decades of margin over the measured drift and fails on any
    wrong noise (a different draw changes the loss by percents) or a wrong scale (N/B).
    """
    x = data()
    seeds = range(100, 150)
    eager_vae, compiled_vae = tiny_vae(), tiny_vae()
    eager_opt = adamw(1e-2)
    eager = GuardedSVI(eager_vae.model, eager_vae.guide, eager_opt, Trace_ELBO())
    with pyro.validation_enabled(False):
        expected = run_steps(lambda xb, rows: eager.step(xb, N, rows), x, seeds)
        step = compile_step(compiled_vae, Trace_ELBO(), adamw(1e-2), num_data=N, batch_size=B, device="cpu")
        got = run_steps(step, x, seeds)
    assert step.compiled_steps == 50 and step.eager_steps == 0
    assert got == pytest.approx(expected, rel=1e-4)
    for a, b in zip(eager_vae.parameters(), compiled_vae.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # A smaller last batch and a step under Pyro validation run the eager step, on the same optimiser.
    with pyro.validation_enabled(False):
        torch.manual_seed(9)
        step(x[:3], torch.arange(3))
    torch.manual_seed(9)
    step(x[:B], torch.arange(B))
    assert step.eager_steps == 2 and step.optimizer.steps == 52


@pytest.mark.slow
def test_compiled_guard_raises_and_skips():
    """A NaN parameter makes the compiled loss NaN: no step, and the guard raises (default) or skips."""
    x = data()
    for policy in ("raise", "skip"):
        vae = tiny_vae()
        optimizer = adamw(1e-2, on_nonfinite=policy)
        step = compile_step(vae, Trace_ELBO(), optimizer, num_data=N, batch_size=B, device="cpu")
        with pyro.validation_enabled(False):
            step(x[:B], torch.arange(B))
            with torch.no_grad():
                vae.decoder.net[-1].bias[0] = float("nan")
            before = {k: v.clone() for k, v in vae.state_dict().items()}
            if policy == "raise":
                with pytest.raises(NonFiniteLossError, match="non-finite|NaN|nan"):
                    step(x[:B], torch.arange(B))
            else:
                step(x[:B], torch.arange(B))
                assert optimizer.skipped == 1
        after = vae.state_dict()
        for k in before:
            torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=True)
        assert optimizer.steps == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_step_agrees_with_eager():
    """On CUDA the step is one CUDA graph (mode="reduce-overhead"); with the same CUDA noise it matches eager.

    Tolerance as in test_compiled_and_eager_steps_agree (float32 reassociation in fused kernels), with TF32 off.
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    x = data().cuda()
    seeds = range(100, 130)
    eager_vae, compiled_vae = tiny_vae().cuda(), tiny_vae().cuda()
    eager = GuardedSVI(eager_vae.model, eager_vae.guide, adamw(1e-2), Trace_ELBO())
    with pyro.validation_enabled(False):
        expected = run_steps(lambda xb, rows: eager.step(xb, N, rows), x, seeds)
        step = compile_step(compiled_vae, Trace_ELBO(), adamw(1e-2), num_data=N, batch_size=B, device="cuda")
        got = run_steps(step, x, seeds)
    assert step.mode == "reduce-overhead" and step.compiled_steps == 30
    assert got == pytest.approx(expected, rel=1e-4)
