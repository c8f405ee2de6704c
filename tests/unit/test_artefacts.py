"""The marks of a film's source (training.artefacts): each puts what it names where it says, nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.artefacts import PROBES, artefacts, bars, equalize, sharpen, stamp_bank, stamps
from training.augment import augment, gaussian_blur
from training.loops import FitConfig

pytestmark = pytest.mark.unit


def film(n: int = 1, size: int = 60, seed: int = 0) -> torch.Tensor:
    """Smooth grey images in (0.2, 0.8): no pixel is 0, so blanked pixels can be counted."""
    g = torch.Generator().manual_seed(seed)
    return 0.2 + 0.6 * gaussian_blur(torch.rand(n, 1, size, size, generator=g), torch.full((n,), 2.0))


def test_bars_blank_exactly_the_outer_fraction_at_the_edges_asked_for() -> None:
    x = film(2)
    out = bars(x, torch.tensor([0.1, 0.25]), torch.tensor([False, True]))
    # image 0: 6 rows at the top and 6 at the bottom; image 1: 15 columns at each side
    assert torch.equal((out[0, 0] == 0).all(dim=1), torch.tensor([True] * 6 + [False] * 48 + [True] * 6))
    assert not bool((out[0, 0] == 0).all(dim=0).any())
    assert torch.equal((out[1, 0] == 0).all(dim=0), torch.tensor([True] * 15 + [False] * 30 + [True] * 15))
    assert torch.equal(out[0, :, 6:54], x[0, :, 6:54]) and torch.equal(out[1, :, :, 15:45], x[1, :, :, 15:45])
    assert torch.equal(bars(x, torch.zeros(2), torch.tensor([False, True])), x)


def test_stamps_print_bright_marks_in_the_top_or_bottom_fifth_of_the_chosen_images_only() -> None:
    x = film(6, size=120)
    on = torch.tensor([True, False, True, False, True, True])
    out = stamps(x, on, generator=torch.Generator().manual_seed(1))
    changed = (out != x).any(dim=1)  # (N, H, W)
    assert not bool(changed[~on].any())
    for i in torch.nonzero(on).flatten().tolist():
        rows = torch.nonzero(changed[i].any(dim=1)).flatten()
        assert rows.numel() > 0
        assert bool(((rows < 24) | (rows >= 96)).all())  # 120 // 5 = 24
        assert bool((out[i] >= x[i]).all()) and float(out[i].max()) >= 0.7  # white print, nothing darkened
    bank = stamp_bank(120)
    assert len(bank) == 11 and all(s.max() > 0.9 and s.shape[0] <= 24 for s in bank)
    with pytest.raises(ValueError, match="height"):
        stamp_bank(8)


def test_equalize_flattens_the_histogram_and_keeps_the_order_of_grey_levels() -> None:
    x = film(2, size=64) * 0.5  # a dark, low-contrast film: levels 25-100 of 255
    out = equalize(x)
    q = (x * 255).round()
    for i in range(2):
        v, o = q[i].flatten(), out[i].flatten()
        order = torch.argsort(v)
        assert bool((torch.diff(o[order]) >= 0).all())  # a darker pixel never becomes the brighter one
        assert float(o.min()) == 0.0 and float(o.max()) == 1.0  # stretched to the full range
        hist = torch.histc(o, bins=4, min=0, max=1)  # about a quarter of the pixels in each quarter
        assert bool((hist > 0.15 * o.numel()).all()), hist
    flat = torch.full((1, 1, 8, 8), 0.4)
    assert torch.isfinite(equalize(flat)).all()


def test_sharpen_adds_detail_and_leaves_flat_regions_alone() -> None:
    x = film(2)
    lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    out = sharpen(x, torch.tensor([0.5, 2.0]))
    d = F.conv2d(out, lap).abs().mean(dim=(1, 2, 3))
    assert float(d[1]) > float(d[0]) > float(F.conv2d(x, lap).abs().mean(dim=(1, 2, 3))[0])
    flat = torch.full((1, 1, 16, 16), 0.4)
    assert torch.allclose(sharpen(flat, torch.tensor([2.0])), flat, atol=1e-6)


def test_artefacts_are_random_per_image_seeded_and_off_at_zero() -> None:
    x = film(1, size=64).repeat(40, 1, 1, 1)
    out = artefacts(x, 0.5, generator=torch.Generator().manual_seed(2))
    changed = (out != x).flatten(1).any(dim=1)
    assert 5 < int(changed.sum()) < 40  # 1 - 0.5^4: most images get at least one mark, not all
    assert len({tuple(np.round(o.flatten()[:64].numpy(), 4)) for o in out[changed]}) > 5  # not all the same
    assert torch.equal(out, artefacts(x, 0.5, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(artefacts(x, 0.0, generator=torch.Generator().manual_seed(2)), x)
    assert bool((artefacts(x, 1.0, generator=torch.Generator().manual_seed(2)) != x).flatten(1).any(1).all())


def test_augment_adds_artefacts_only_when_asked_and_never_to_masks() -> None:
    x, m = film(4, size=48), (torch.rand(4, 1, 48, 48) > 0.5).float()
    plain = augment(x, m, generator=torch.Generator().manual_seed(5))
    marked = augment(x, m, generator=torch.Generator().manual_seed(5), artefacts=1.0)
    assert torch.equal(plain[0], augment(x, m, generator=torch.Generator().manual_seed(5), artefacts=0.0)[0])
    assert not torch.equal(plain[0], marked[0]) and torch.equal(plain[1], marked[1])


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_artefact_probability_out_of_range_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="artefacts"):
        augment(torch.rand(1, 1, 16, 16), artefacts=bad)
    with pytest.raises(ValueError, match='"p"'):
        artefacts(torch.rand(1, 1, 16, 16), bad)
    with pytest.raises(ValueError, match="artefact_augment"):
        FitConfig(artefact_augment=bad)


def test_every_probe_changes_every_image_the_same_way_each_time() -> None:
    x = film(3, size=96)
    for name, probe in PROBES.items():
        out = probe(x)
        assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1, name
        assert bool((out != x).flatten(1).any(1).all()), name
        assert torch.equal(out, probe(x)), name  # fixed strength: a check, not a draw
    with pytest.raises(ValueError, match="N, C, H, W"):
        equalize(torch.rand(16, 16))
