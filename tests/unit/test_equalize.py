"""Stage 2's input equalisation: its definition on hand-made images, and the hook that applies it."""

from __future__ import annotations

import pytest
import torch

from inference.models.classifiers import (
    build_classifier,
    build_stage2,
    equalize,
    equalize_inputs,
    is_equalizing,
)

pytestmark = pytest.mark.unit

MEAN, STD = 0.5, 0.25


def _norm(img: torch.Tensor) -> torch.Tensor:
    return (img - MEAN) / STD


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


def test_each_grey_level_becomes_the_share_of_image_pixels_at_or_below_it() -> None:
    """4 background pixels (0), 6 at 0.3, 6 at 0.7: 0.3 -> 6/12, 0.7 -> 12/12, background stays 0."""
    img = torch.tensor([0.0] * 4 + [0.3] * 6 + [0.7] * 6).reshape(1, 1, 4, 4)
    out = _unit(equalize(_norm(img), MEAN, STD)).flatten()
    assert torch.allclose(out, torch.tensor([0.0] * 4 + [0.5] * 6 + [1.0] * 6), atol=1e-6)


def test_an_increasing_grey_mapping_changes_nothing() -> None:
    gen = torch.Generator().manual_seed(0)
    img = 0.05 + 0.95 * torch.rand(3, 1, 48, 40, generator=gen)
    img[:, :, :6] = 0.0  # padding bars
    mapped = torch.where(img > 0, 0.2 + 0.7 * img**2, torch.full_like(img, 0.1))  # window, gamma, offset
    a, b = equalize(_norm(img), MEAN, STD), equalize(_norm(mapped), MEAN, STD)
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(_norm(img), _norm(mapped), atol=1e-2)  # the inputs differ


def test_background_stays_black_and_does_not_count() -> None:
    """The same image with a thin and with thick padding bars: its own pixels get the same values (the
    share among its 1,200 pixels only), the bars 0."""
    gen = torch.Generator().manual_seed(1)
    img = 0.05 + 0.95 * torch.rand(1, 1, 30, 40, generator=gen)

    def bars(rows: int) -> torch.Tensor:
        return torch.zeros(1, 1, rows, 40)

    out_thin = _unit(equalize(_norm(torch.cat([bars(1), img], dim=2)), MEAN, STD))
    out_thick = _unit(equalize(_norm(torch.cat([bars(10), img, bars(10)], dim=2)), MEAN, STD))
    assert torch.allclose(out_thick[:, :, 10:40], out_thin[:, :, 1:], atol=1e-6)
    assert (out_thick[:, :, :10] == 0).all() and (out_thick[:, :, 40:] == 0).all()
    assert (out_thin[:, :, 0] == 0).all()
    image = out_thin[:, :, 1:]
    assert float(image.max()) == pytest.approx(1.0) and float(image.min()) == pytest.approx(1 / 1200)


def test_each_image_of_a_batch_is_equalised_on_its_own() -> None:
    gen = torch.Generator().manual_seed(2)
    batch = 0.05 + 0.95 * torch.rand(4, 1, 16, 16, generator=gen)
    batch[1] = batch[1] * 0.3  # a darker image
    together = equalize(_norm(batch), MEAN, STD)
    for i in range(4):
        assert torch.allclose(together[i : i + 1], equalize(_norm(batch[i : i + 1]), MEAN, STD), atol=1e-6)


def test_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="N, C, H, W"):
        equalize(torch.zeros(16, 16), MEAN, STD)


@pytest.mark.parametrize("members", [1, 2])
def test_the_hook_feeds_every_network_equalised_inputs_once(members: int) -> None:
    torch.manual_seed(0)
    model = build_stage2("resnet18", members).eval() if members > 1 else build_classifier("resnet18").eval()
    x = _norm(torch.rand(2, 1, 64, 64))
    with torch.inference_mode():
        expected = model(equalize(x, MEAN, STD))
        assert not is_equalizing(model)
        equalize_inputs(model, MEAN, STD)
        equalize_inputs(model, MEAN, STD)  # a second call adds nothing
        assert is_equalizing(model)
        assert torch.allclose(model(x), expected, atol=1e-5)
        hooks = [len(m._forward_pre_hooks) for m in (model.members if members > 1 else [model])]
    assert hooks == [1] * members
