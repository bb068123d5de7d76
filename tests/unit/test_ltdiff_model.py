"""LTDiff++ networks: UNet++ node shapes, deep supervision, latent shape, denoiser, schedule."""

from __future__ import annotations

import pytest
import torch
from ltdiff_support import TINY_AE, TINY_DENOISER

from engine.ltdiff.latent_diffusion import (
    LatentDenoiser,
    NoiseSchedule,
    ScheduleConfig,
    q_sample,
    split_prediction,
    training_target,
)
from engine.ltdiff.unetpp import NestedUNet, UNetPlusPlusAutoencoder, UNetPPConfig


def test_every_unetpp_node_has_the_resolution_and_width_of_its_row() -> None:
    torch.manual_seed(0)
    net = NestedUNet(3, (4, 8, 16, 32), groups=2)
    nodes = net.forward_nodes(torch.randn(2, 3, 32, 48))
    depth = 3
    expected = {(i, j) for i in range(depth + 1) for j in range(depth + 1 - i)}
    assert set(nodes) == expected, f"UNet++ grid nodes: got {sorted(nodes)}"
    for (i, j), x in nodes.items():
        assert x.shape == (2, (4, 8, 16, 32)[i], 32 >> i, 48 >> i), f"X({i},{j}) {x.shape}"


def test_nested_node_reads_all_left_neighbours_and_the_upsampled_node_below() -> None:
    # X(0, 2) = H([X(0,0), X(0,1), U(X(1,1))]): input width 2 * c0 + c1.
    net = NestedUNet(1, (4, 8, 16), groups=2)
    block = net.nodes["x0_2"]
    assert block.conv1.in_channels == 2 * 4 + 8
    assert net.nodes["x1_1"].conv1.in_channels == 1 * 8 + 16


def test_deep_supervision_has_one_full_resolution_head_per_top_row_node() -> None:
    torch.manual_seed(0)
    ae = UNetPlusPlusAutoencoder(TINY_AE)
    heads = ae(torch.randn(3, 1, 32, 32))
    assert len(heads) == TINY_AE.n_heads == len(TINY_AE.decoder_channels) - 1
    assert all(h.shape == (3, 1, 32, 32) for h in heads)


def test_latent_is_at_half_resolution_with_the_configured_channels() -> None:
    ae = UNetPlusPlusAutoencoder(TINY_AE)
    z = ae.encode(torch.randn(2, 1, 32, 64))
    assert z.shape == (2, TINY_AE.latent_channels, 16, 32)
    assert ae.decode(z).shape == (2, 1, 32, 64)


def test_decoder_output_depends_only_on_the_latent() -> None:
    # No skip from the encoder: two images with the same latent decode identically.
    torch.manual_seed(0)
    ae = UNetPlusPlusAutoencoder(TINY_AE).eval()
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(ae.decode(z), ae.decode(z.clone()))
        assert ae.decode(z).shape == (1, 1, 32, 32)


def test_mean_output_mode_averages_the_heads() -> None:
    cfg = UNetPPConfig(**{**TINY_AE.__dict__, "output": "mean"})
    torch.manual_seed(0)
    ae = UNetPlusPlusAutoencoder(cfg).eval()
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        heads = ae.decode_heads(z)
        torch.testing.assert_close(ae.decode(z), sum(heads) / len(heads))


def test_latent_with_fewer_channels_than_a_pixel_block_is_refused() -> None:
    with pytest.raises(ValueError, match="losslessly"):
        UNetPPConfig(latent_channels=3, patch=2)


def test_denoiser_maps_latent_to_latent_and_starts_at_zero() -> None:
    torch.manual_seed(0)
    den = LatentDenoiser(TINY_DENOISER)
    z = torch.randn(2, 4, 16, 16)
    out = den(z, torch.tensor([0, 50]), torch.randn_like(z))
    assert out.shape == z.shape
    assert torch.count_nonzero(out) == 0, "zero-initialized head must predict 0 before training"


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v"])
def test_split_prediction_inverts_the_training_target(prediction: str) -> None:
    schedule = NoiseSchedule.from_config(ScheduleConfig())
    torch.manual_seed(0)
    z0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 900])
    z_t = q_sample(schedule, z0, t, noise)
    abar = schedule.abar(t, z0)
    target = training_target(prediction, z0, noise, abar)  # type: ignore[arg-type]
    z0_hat, eps_hat = split_prediction(prediction, target, z_t, abar)  # type: ignore[arg-type]
    torch.testing.assert_close(z0_hat, z0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(eps_hat, noise, atol=2e-3, rtol=1e-3)


def test_untrained_autoencoder_starts_from_a_lossless_pixel_path() -> None:
    # The shortcuts start as the identity on the 2x2 pixel block and the decoder heads at zero:
    # the first 4 latent channels carry the pixels (plus a small learned term) and the decoder
    # starts by reading them back, so training begins close to a lossless round trip.
    torch.manual_seed(0)
    ae = UNetPlusPlusAutoencoder(UNetPPConfig()).eval()
    z = torch.randn(1, 8, 16, 16)
    with torch.no_grad():
        for head in ae.decode_heads(z):
            torch.testing.assert_close(head, torch.nn.functional.pixel_shuffle(z[:, :4], 2))
        x = torch.randn(1, 1, 32, 32)
        shortcut = ae.encoder_shortcut(torch.nn.functional.pixel_unshuffle(x, 2))
    torch.testing.assert_close(shortcut[:, :4], torch.nn.functional.pixel_unshuffle(x, 2))
    assert torch.count_nonzero(shortcut[:, 4:]) == 0


@pytest.mark.parametrize("target", ["residual", "latent"])
def test_standard_latent_inverts_the_diffusion_target(target: str) -> None:
    from engine.ltdiff.latent_diffusion import diffusion_x0, standard_latent

    torch.manual_seed(0)
    z_a, z_b = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x0 = diffusion_x0(target, z_a, z_b, 7.0)  # type: ignore[arg-type]
    if target == "residual":
        torch.testing.assert_close(x0, 7.0 * (z_b - z_a))
    torch.testing.assert_close(standard_latent(target, z_a, x0, 7.0), z_b)  # type: ignore[arg-type]


def test_inference_in_place_activations_give_the_numbers_of_the_autograd_path() -> None:
    """Without a gradient the blocks run SiLU and FiLM in place: the same numbers, bit for bit,
    as the out-of-place code that training runs (both precisions of the engine)."""
    torch.manual_seed(0)
    ae = UNetPlusPlusAutoencoder(TINY_AE)
    den = LatentDenoiser(TINY_DENOISER)
    with torch.no_grad():
        for param in den.head.parameters():  # zero-initialized: give it something to pass on
            param.normal_(0.0, 0.1)
    x = torch.randn(2, 1, 32, 32)
    t = torch.tensor([999, 10])

    def run() -> tuple[torch.Tensor, ...]:
        z = ae.encode(x)
        return z, den(z, t, z), ae.decode(z)

    with torch.enable_grad():
        reference = [v.detach() for v in run()]
    with torch.inference_mode():
        fast = run()
    for ref, got in zip(reference, fast, strict=True):
        assert torch.equal(ref, got)
