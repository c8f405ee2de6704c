"""Texture augmentation (blur, sharpening, noise): what it changes, what it keeps, and that it is optional."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.augment import augment, gaussian_blur, texture
from training.loops import FitConfig

pytestmark = pytest.mark.unit

LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


def detail(x: torch.Tensor) -> torch.Tensor:
    """Mean Laplacian magnitude per image: high-frequency content."""
    return F.conv2d(x, LAPLACE).abs().mean(dim=(1, 2, 3))


def test_gaussian_blur_keeps_constants_and_each_image_gets_its_own_sigma() -> None:
    flat = torch.full((2, 1, 24, 24), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([0.7, 2.0])), flat, atol=1e-6)
    x = torch.rand(1, 1, 48, 48).repeat(3, 1, 1, 1)
    out = gaussian_blur(x, torch.tensor([0.6, 1.2, 2.0]))
    d = detail(out)
    assert d[0] > d[1] > d[2] and d[0] < detail(x[:1])[0]
    assert torch.allclose(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=0.01)  # blurring moves no mass
    # a kernel wider than the image is cut to fit instead of failing
    assert gaussian_blur(torch.rand(2, 1, 5, 5), torch.tensor([3.0, 3.0])).shape == (2, 1, 5, 5)


def test_texture_with_probability_one_blurs_sharpens_and_adds_noise() -> None:
    smooth = gaussian_blur(torch.rand(1, 1, 64, 64), torch.tensor([3.0])).repeat(8, 1, 1, 1)
    out = texture(smooth, 1.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == smooth.shape and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert bool((detail(out) > 2 * detail(smooth)).all())  # noise on a smooth film adds detail
    assert not torch.equal(out[0], out[1])  # every image draws its own degradation
    assert torch.equal(texture(smooth, 0.0, generator=torch.Generator().manual_seed(0)), smooth.clamp(0, 1))


def test_texture_mixes_smooth_and_detailed_images_across_a_batch() -> None:
    """With p = 0.5 the texture of an image no longer says which batch half it came from."""
    g = torch.Generator().manual_seed(3)
    base = gaussian_blur(torch.rand(1, 1, 64, 64, generator=g), torch.tensor([2.0]))
    x = base.repeat(200, 1, 1, 1)
    out = texture(x, 0.5, generator=g)
    d = detail(out)
    ref = float(detail(base)[0])
    assert float((d < 0.9 * ref).float().mean()) > 0.1  # some came out smoother (blur only)
    assert float((d > 1.5 * ref).float().mean()) > 0.35  # and many sharper or noisier (noise: p = 0.5)


def test_style_zero_repeats_the_plain_augmentation_exactly() -> None:
    x, m = torch.rand(4, 1, 32, 32), (torch.rand(4, 1, 32, 32) > 0.5).float()
    plain = augment(x, m, generator=torch.Generator().manual_seed(5))
    zero = augment(x, m, generator=torch.Generator().manual_seed(5), style=0.0)
    styled = augment(x, m, generator=torch.Generator().manual_seed(5), style=1.0)
    assert torch.equal(plain[0], zero[0]) and torch.equal(plain[1], zero[1])
    assert not torch.equal(plain[0], styled[0]) and torch.equal(plain[1], styled[1])  # masks are not degraded
    again = augment(x, m, generator=torch.Generator().manual_seed(5), style=1.0)
    assert torch.equal(styled[0], again[0])  # seeded


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_style_out_of_range_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="style"):
        augment(torch.rand(1, 1, 16, 16), style=bad)
    with pytest.raises(ValueError, match="style_augment"):
        FitConfig(style_augment=bad)
