"""Guidance maths against hand-computed values, diffusers and the Imagen definition."""

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    rescale_noise_cfg,
)

from renderqa.core.guidance import (
    combine_cfg,
    denoised_from_output,
    output_from_denoised,
    per_sample,
    rescale_guidance,
    sample_quantile,
    saturated_fraction,
    std_ratio,
    threshold_pixel,
    threshold_to_reference,
)


def test_combine_cfg_hand_values():
    uncond = torch.tensor([[1.0, 2.0]])
    cond = torch.tensor([[3.0, 1.0]])
    assert combine_cfg(uncond, cond, 2.0).tolist() == [[5.0, 0.0]]


def test_combine_cfg_per_sample_scales():
    uncond = torch.zeros(2, 1, 2, 2)
    cond = torch.ones(2, 1, 2, 2)
    guided = combine_cfg(uncond, cond, per_sample([3.0, 9.0], cond))
    assert guided[0].unique().tolist() == [3.0]
    assert guided[1].unique().tolist() == [9.0]


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (2, 4, 3, 8, 8)])
@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
def test_rescale_matches_diffusers_bitwise(shape, phi):
    generator = torch.Generator().manual_seed(0)
    cond = torch.randn(shape, generator=generator)
    cfg = 3.0 * torch.randn(shape, generator=generator)
    expected = rescale_noise_cfg(cfg, cond, guidance_rescale=phi)
    actual = rescale_guidance(
        cfg, cond, per_sample([phi] * 2, cfg), per_sample([1 - phi] * 2, cfg)
    )
    assert torch.equal(actual, expected), (actual - expected).abs().max()


def test_rescale_full_matches_cond_std():
    generator = torch.Generator().manual_seed(1)
    cond = torch.randn(3, 4, 16, 16, generator=generator)
    cfg = 5.0 * cond + 0.5
    rescaled = rescale_guidance(cfg, cond, 1.0)
    stds = rescaled.std(dim=(1, 2, 3))
    assert torch.allclose(stds, cond.std(dim=(1, 2, 3)), rtol=1e-5)


def test_rescale_guards_zero_std():
    cond = torch.randn(2, 4, 4, 4)
    cfg = torch.full((2, 4, 4, 4), 0.25)
    rescaled = rescale_guidance(cfg, cond, 0.7)
    assert torch.isfinite(rescaled).all()
    assert torch.equal(rescaled, cfg)


def test_std_ratio_hand_value_on_video_latents():
    cond = torch.randn(2, 4, 3, 8, 8)
    guided = torch.cat([1.4 * cond[:1], 2.0 * cond[1:]])
    ratio = std_ratio(guided, cond)
    assert ratio.shape == (2,)
    assert ratio.tolist() == pytest.approx([1.4, 2.0], rel=1e-5)


def test_sample_quantile_matches_torch_quantile():
    x = torch.randn(3, 4, 5, 6)
    expected = torch.quantile(x.reshape(3, -1), 0.995, dim=1)
    assert torch.allclose(sample_quantile(x, 0.995).flatten(), expected, atol=1e-6)
    per_channel = torch.quantile(x.reshape(3, 4, -1), 0.9, dim=2)
    assert torch.allclose(
        sample_quantile(x, 0.9, per_channel=True).reshape(3, 4), per_channel, atol=1e-6
    )


def test_threshold_pixel_hand_values():
    x0 = torch.tensor([[-3.0, -0.5, 0.5, 3.0]])
    out = threshold_pixel(x0, percentile=1.0)
    assert out[0].tolist() == pytest.approx([-1.0, -0.5 / 3, 0.5 / 3, 1.0])


def test_threshold_pixel_leaves_unit_range_alone():
    x0 = torch.tensor([[-0.9, 0.2, 0.99]])
    assert torch.equal(threshold_pixel(x0, 0.995), x0)


def test_threshold_pixel_matches_imagen_definition():
    generator = torch.Generator().manual_seed(2)
    x0 = 2.5 * torch.randn(2, 3, 16, 16, generator=generator)
    p = 0.995
    expected = []
    for sample in x0.numpy():
        s = max(np.percentile(np.abs(sample), 100 * p), 1.0)
        expected.append(np.clip(sample, -s, s) / s)
    actual = threshold_pixel(x0, p).numpy()
    assert np.abs(actual - np.stack(expected)).max() < 1e-6


def test_threshold_to_reference_identity_at_equal_reference():
    x0 = 4.0 * torch.randn(2, 4, 8, 8)
    assert torch.equal(threshold_to_reference(x0, x0.clone(), 0.995), x0)


def test_threshold_to_reference_hand_values():
    denoised = torch.tensor([[4.0, -2.0, 1.0, 0.5]])
    reference = torch.tensor([[2.0, -1.0, 0.5, 0.25]])
    out = threshold_to_reference(denoised, reference, percentile=1.0)
    assert out.tolist() == [[2.0, -1.0, 0.5, 0.25]]


def test_threshold_to_reference_bounds_to_reference_range():
    generator = torch.Generator().manual_seed(3)
    denoised = 6.0 * torch.randn(2, 4, 8, 8, generator=generator)
    reference = 0.5 * denoised + 0.1 * torch.randn(2, 4, 8, 8, generator=generator)
    r = sample_quantile(reference.abs(), 0.995)
    out = threshold_to_reference(denoised, reference, 0.995)
    assert (out.abs() <= r + 1e-5).all()


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_denoised_round_trip(kind):
    sample = torch.randn(1, 4, 8, 8)
    output = torch.randn(1, 4, 8, 8)
    alpha, sigma = 0.6, 0.8
    x0 = denoised_from_output(output, sample, alpha, sigma, kind)
    back = output_from_denoised(x0, sample, alpha, sigma, kind)
    assert torch.allclose(back, output, atol=1e-5)


def test_denoised_epsilon_hand_value():
    x0 = denoised_from_output(
        torch.tensor([1.0]), torch.tensor([2.0]), 0.5, 0.5, "epsilon"
    )
    assert x0.tolist() == [3.0]


def test_saturated_fraction_hand_values():
    pixels = np.full((2, 2, 3), 0.5, dtype=np.float32)
    pixels[0, 0, 1] = 0.98
    pixels[1, 1, :] = 0.97  # at the threshold, not above it
    assert saturated_fraction(pixels) == 0.25
    assert saturated_fraction(pixels, threshold=0.9) == 0.5
