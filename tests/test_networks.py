"""The network registry and the ``conv`` pair (issue 13 part 3), and colour images end to end (part 4)."""

import inspect
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from torch import nn

from pyro_vae import cli
from pyro_vae.checkpoint import Progress, TrainingState
from pyro_vae.config import ModelConfig, RunConfig, TrainConfig
from pyro_vae.data import DataRecord
from pyro_vae.errors import CheckpointError, ConfigError, DataError
from pyro_vae.likelihoods import likelihood_names
from pyro_vae.model import VAE
from pyro_vae.networks import ConvDecoder, ConvEncoder, make_networks, network_names
from pyro_vae.optim import adamw
from pyro_vae.run_dir import load_run
from pyro_vae.step import TrainStep

# (C, H, W) images: the smallest side, a grey MNIST size, a colour CIFAR size, and odd sides that are no powers of two.
SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (1, 13, 17), (3, 9, 11)]


def conv(shape, *, params_per_dim=1, num_params=6, latent_dim=3, channels=(4, 6)):
    d = math.prod(shape)
    return make_networks(
        "conv",
        input_shape=shape,
        latent_dim=latent_dim,
        num_params=num_params,
        output_dim=params_per_dim * d,
        hidden_dims=(5,),
        activation="silu",
        conv_channels=channels,
    )


def test_registry_names_and_default_widths():
    assert network_names() == ["conv", "mlp"]
    default = inspect.signature(make_networks).parameters["conv_channels"].default
    assert default == ModelConfig().conv_channels == inspect.signature(VAE).parameters["conv_channels"].default


def test_unknown_network_names_the_closest():
    with pytest.raises(ConfigError, match="unknown network 'cnv'.*did you mean 'conv'"):
        make_networks("cnv", input_shape=(64,), latent_dim=2, num_params=4, output_dim=64, hidden_dims=(8,))


def _side_sizes(side, depth):
    """Reference: a k=3, s=2, p=1 convolution maps n to floor((n + 2·1 − 3) / 2) + 1 (torch's Conv2d formula)."""
    sizes = [side]
    for _ in range(depth):
        sizes.append((sizes[-1] + 2 - 3) // 2 + 1)
    return sizes


@pytest.mark.parametrize("params_per_dim", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_conv_shapes_come_out_exact(shape, params_per_dim):
    """Every feature map has the size the Conv2d formula gives, the decoder retraces them exactly in reverse (also for
    sides that are no powers of two), and the outputs are (B, num_params) and (..., P·D)."""
    channels = (4, 6, 5)
    encoder, decoder = conv(shape, params_per_dim=params_per_dim, channels=channels)
    c, h, w = shape
    maps = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: maps.append(tuple(o.shape[1:])))
        for m in (*encoder.modules(), *decoder.modules())
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))
    ]
    x = torch.rand(5, math.prod(shape))
    assert encoder(x).shape == (5, 6)
    z = torch.randn(2, 5, 3)  # vectorised particles: (P, B, L)
    assert decoder(z).shape == (2, 5, params_per_dim * math.prod(shape))
    for hook in hooks:
        hook.remove()
    hs, ws = _side_sizes(h, len(channels)), _side_sizes(w, len(channels))
    down = [(width, hs[i + 1], ws[i + 1]) for i, width in enumerate(channels)]
    widths = [params_per_dim * c, *channels[:-1]]
    up = [(widths[i], hs[i], ws[i]) for i in reversed(range(len(channels)))]
    assert maps == down + up


def test_legacy_two_axis_shape_is_one_grey_channel():
    encoder, decoder = conv((13, 17))
    assert encoder.image_shape == (1, 13, 17) and decoder(torch.zeros(4, 3)).shape == (4, 221)


def test_encoder_reads_rows_channel_first():
    """The encoder equals an independent forward pass: F.conv2d on x.reshape(B, C, H, W) with the same weights."""
    torch.manual_seed(0)
    encoder, _ = conv((3, 9, 11))
    x = torch.rand(4, 297)
    h = x.reshape(4, 3, 9, 11)
    for layer in [m for m in encoder.body if isinstance(m, nn.Conv2d)]:
        h = F.silu(F.conv2d(h, layer.weight, layer.bias, stride=2, padding=1))
    reference = h.flatten(1) @ encoder.head.weight.T + encoder.head.bias
    # Same operations, so only float32 rounding of the head's sum order differs (outputs are O(1), eps 1.2e-7).
    assert (encoder(x) - reference).abs().max() < 1e-6


@pytest.mark.parametrize("shape", [(1, 13, 17), (3, 8, 10)])
def test_decoder_output_is_param_major(shape):
    """Reshaped (B, P, C, H, W), block [:, p] is parameter p's image: with the last layer's weights zero and bias
    p·C + c on output channel p·C + c, the output holds p·C + c at [:, p, c] everywhere."""
    params_per_dim, (c, h, w) = 3, shape
    _, decoder = conv(shape, params_per_dim=params_per_dim)
    last = [m for m in decoder.modules() if isinstance(m, nn.ConvTranspose2d)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.arange(params_per_dim * c, dtype=torch.float32))
    out = decoder(torch.randn(4, 3)).reshape(4, params_per_dim, c, h, w)
    expected = torch.arange(params_per_dim * c, dtype=torch.float32).reshape(1, params_per_dim, c, 1, 1)
    assert torch.equal(out, expected.expand_as(out))


def test_gradients_reach_every_conv_parameter():
    torch.manual_seed(0)
    encoder, decoder = conv((3, 16, 16), params_per_dim=2)
    loss = encoder(torch.rand(6, 768)).square().sum() + decoder(torch.randn(6, 3)).square().sum()
    loss.backward()
    for module in (encoder, decoder):
        for name, p in module.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_conv_refuses_flat_data_and_small_images():
    with pytest.raises(DataError) as info:
        VAE(784, network="conv")
    message = str(info.value)
    assert "\n" not in message and "flat vectors of shape (784,)" in message
    assert "image-shaped" in message and "--network mlp" in message
    with pytest.raises(DataError, match=r"at least 8×8 pixels but these are 7×20 \(image shape \(3, 7, 20\)\)"):
        VAE(420, network="conv", image_shape=(3, 7, 20))
    with pytest.raises(ConfigError, match="output_dim must be a multiple of D"):
        make_networks("conv", input_shape=(1, 8, 8), latent_dim=2, num_params=4, output_dim=65, hidden_dims=(8,))
    with pytest.raises(ConfigError, match="every entry of conv_channels"):
        conv((1, 8, 8), channels=(4, 0))
    with pytest.raises(ConfigError, match="conv_channels"):
        ModelConfig(conv_channels=(32, -1))


def prototypes(n, seed=0):
    """(n, 3·16·16) binary colour images, each one of two prototypes made of coloured half-planes (red left and green
    top, or blue bottom and green right): spatial structure a conv decoder can draw, learnable to about log 2 nats."""
    a, b = torch.zeros(3, 16, 16), torch.zeros(3, 16, 16)
    a[0, :, :8] = a[1, :8, :] = 1
    b[2, 8:, :] = b[1, :, 8:] = 1
    g = torch.Generator().manual_seed(seed)
    return torch.stack([a.flatten(), b.flatten()])[torch.randint(0, 2, (n,), generator=g)]


def test_a_tiny_conv_vae_trains_on_colour_images():
    """A conv VAE on (N, 3, 16, 16) data learns: TrainStep's loss falls from D·log 2 ≈ 532 nats (a decoder whose
    logits are near 0) to under a third of it in 60 steps (about 100 nats at the end; the step-to-step noise is a
    few nats, so the margin is tens of standard deviations)."""
    torch.manual_seed(0)
    x = prototypes(16)
    vae = VAE(768, latent_dim=2, network="conv", image_shape=(3, 16, 16), conv_channels=(4, 8))
    assert isinstance(vae.encoder, ConvEncoder) and isinstance(vae.decoder, ConvDecoder)
    step = TrainStep(vae, TrainConfig(lr=3e-2), num_data=16)
    losses = [step.step(x) for _ in range(60)]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert abs(first - 768 * math.log(2)) < 30 and last < first / 3, (first, last)


def test_conv_vae_runs_vectorised_particles():
    """The model and guide with (P, B, L) latents: the decoder keeps the leading particle axis."""
    vae = VAE(768, latent_dim=2, network="conv", image_shape=(3, 16, 16), conv_channels=(4,))
    svi = SVI(vae.model, vae.guide, adamw(1e-3), Trace_ELBO(num_particles=3, vectorize_particles=True))
    assert math.isfinite(svi.step(prototypes(5)))


# ----------------------------------------------------------------------------------------- colour images, end to end


def run(capsys, *argv):
    """``pyro-vae ARGV`` in this process: (exit code, stderr lines)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


TINY_CONV = ["--network", "conv", "--conv-channels", "4,8", "--latent-dim", "2", "--epochs", "1", "--batch-size"]
TINY_CONV += ["16", "--threads", "1", "--no-figures", "--binarize", "none"]


def colour_npz(path, n=40):
    """(N, 32, 32, 3) uint8 colour patches stored channels-last, as numpy image tools write them."""
    x = np.random.default_rng(0).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    np.savez(path, x=x)
    return x


def _train_colour(capsys, tmp_path, likelihood):
    x = colour_npz(tmp_path / "patches.npz")
    out = tmp_path / "run"
    code, lines = run(capsys, "train", "--data", tmp_path / "patches.npz", *TINY_CONV, "--likelihood", likelihood,
                      "--out", out)  # fmt: skip
    assert code == 0, lines
    loaded = load_run(out)
    assert loaded.state.image_shape == [3, 32, 32]
    assert isinstance(loaded.vae.encoder, ConvEncoder) and loaded.vae.config.network == "conv"
    assert loaded.vae.sample(4).shape == (4, 3072)
    # The run's test images are the file's, transposed channel-first: row = x[i].transpose(2, 0, 1).ravel() / 255.
    rows = torch.from_numpy(x.transpose(0, 3, 1, 2).reshape(len(x), -1) / np.float32(255.0))
    test = loaded.test_images()
    assert ((test[:, None, :] == rows[None]).all(-1).sum(1) == 1).all()
    code, lines = run(capsys, "evaluate", out, "--k", "1,2")
    assert code == 0, lines
    record = json.loads((out / "eval.json").read_text())
    assert record["num_images"] == len(test)
    return record


def test_colour_npz_trains_with_conv_continuous_bernoulli(capsys, tmp_path):
    """Issue 13's done-when, with the likelihood that exists today: an (N, 32, 32, 3) uint8 npz trains with
    --network conv --binarize none, records (3, 32, 32), loads with load_run and evaluates."""
    _train_colour(capsys, tmp_path, "continuous_bernoulli")


@pytest.mark.skipif("discretized_logistic" not in likelihood_names(), reason="discretized_logistic not registered")
def test_colour_npz_trains_with_conv_discretized_logistic(capsys, tmp_path):
    """Issue 13's done-when in full: the 8-bit likelihood on the same colour npz, evaluated in bits/dim."""
    record = _train_colour(capsys, tmp_path, "discretized_logistic")
    # A discrete likelihood gives each image a probability of at most 1, so bits/dim are positive (a density on
    # [0, 1] could give negative ones); the bounds are over D = 3·32·32 values.
    assert record["input_dim"] == 3072
    bits = [bound["bits_per_dim"] for bound in record["log_likelihood"]]
    assert len(bits) == 2 and all(math.isfinite(b) and b > 0 for b in bits), bits


def test_conv_on_flat_npz_is_one_line_and_writes_nothing(capsys, tmp_path):
    np.savez(tmp_path / "flat.npz", x=np.random.default_rng(0).random((20, 64)))
    argv = ["train", "--data", tmp_path / "flat.npz", *TINY_CONV, "--likelihood", "continuous_bernoulli"]
    code, lines = run(capsys, *argv, "--out", tmp_path / "run")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("pyro-vae: error: ") and "network 'conv' needs images (C, H, W)" in lines[0]
    assert not (tmp_path / "run").exists()


def test_bad_conv_channels_flag_is_one_line(capsys, tmp_path):
    code, lines = run(capsys, "train", "--conv-channels", "32,0", "--out", tmp_path / "run")
    assert code == 2 and len(lines) == 1 and "conv_channels" in lines[0], lines


# ------------------------------------------------------------------------------------------------- checkpoints


def _payload(image_shape, input_dim=6):
    """A valid checkpoint payload of a tiny flat VAE, with ``image_shape`` as a file would hold it."""
    config = RunConfig(model=ModelConfig(latent_dim=2, hidden_dims=(8,)), train=TrainConfig(epochs=1, batch_size=4))
    state = TrainingState(
        run_id="",
        config=config.to_dict(),
        versions={"torch": str(torch.__version__)},
        input_dim=input_dim,
        image_shape=None,
        data=DataRecord("tiny", 8, 4, "ab" * 32, None),
        world_size=1,
        global_batch=4,
        model=VAE.from_config(config.model, input_dim).state_dict(),
        optimizer={},
        schedules={},
        rng={"torch": torch.get_rng_state(), "cuda": []},
        progress=Progress(0, 0, 1),
        losses=torch.zeros(1, dtype=torch.float64),
        records=[],
        metrics_offset=0,
    )
    return {"format_version": 3, **state.to_payload(), "image_shape": image_shape}


def test_checkpoint_image_shape_legacy_and_colour():
    """Checkpoints written before colour images hold [H, W]: they load as [1, H, W]; [C, H, W] loads as is."""
    assert TrainingState.from_payload(_payload([2, 3], 6), source="t").image_shape == [1, 2, 3]
    assert TrainingState.from_payload(_payload([3, 1, 2], 6), source="t").image_shape == [3, 1, 2]
    with pytest.raises(CheckpointError, match=r"field 'image_shape' is \[1, 1, 2, 3\], not None or a list \[C, H, W\]"):
        TrainingState.from_payload(_payload([1, 1, 2, 3], 6), source="t")
