"""Grad-CAM / Grad-CAM++: shapes, hooks released, memory flat over many calls; lung attention; overlays."""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest
import torch

from inference.explain import CAM_METHODS, cam_forward, explain_forward, jet, lung_attention, overlay
from inference.models.classifiers import CLASSIFIERS, build_classifier, build_stage2, prepare_cam

pytestmark = pytest.mark.unit


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def _frozen(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_classifier(name).eval()
    (target,) = prepare_cam(name, model)
    return model, target


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_cam_shapes_and_same_logits_as_plain_forward(name: str, method: str) -> None:
    model, target = _frozen(name)
    x = torch.randn(2, 1, 64, 64)
    start = time.perf_counter()
    maps, logits, t_forward = cam_forward(model, target, x, 1, method)
    elapsed = time.perf_counter() - start
    assert maps.shape == (2, 64, 64) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert logits.shape == (2, 2)
    assert 0.0 < t_forward < elapsed  # the forward pass only, not the backward and the CAM
    with torch.inference_mode():
        assert torch.allclose(model(x), logits, atol=1e-5)
    assert _hook_count(model) == 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_ensemble_heatmap_is_the_mean_of_its_members(name: str) -> None:
    torch.manual_seed(0)
    model = build_stage2(name, 3).eval()
    targets = prepare_cam(name, model)
    assert len(targets) == 3 and len({id(t) for t in targets}) == 3
    x = torch.randn(2, 1, 64, 64)
    maps, logits, _ = explain_forward(model, targets, x, 1, "gradcam++")
    with torch.inference_mode():
        assert torch.allclose(model(x), logits, atol=1e-5)
    parts = [cam_forward(m, t, x, 1, "gradcam++")[0] for m, t in zip(model.members, targets, strict=True)]
    mean = np.mean(parts, axis=0)
    mean = mean - mean.min(axis=(1, 2), keepdims=True)
    expected = mean / (mean.max(axis=(1, 2), keepdims=True) + 1e-7)
    assert maps.shape == (2, 64, 64)
    assert np.allclose(maps, expected, atol=1e-5)
    assert not np.allclose(parts[0], parts[1], atol=0.05)  # the members do look at different places
    assert _hook_count(model) == 0
    with pytest.raises(ValueError, match="one layer per member"):
        explain_forward(model, targets[:2], x, 1)


class _Probe(torch.nn.Module):
    """conv 3x3 -> ReLU (the CAM's layer, at input resolution) -> sum of squares per channel -> linear."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, channels, 3, padding=1)
        self.act = torch.nn.ReLU()
        self.head = torch.nn.Linear(channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)).square().sum(dim=(2, 3)))


def _minmax(cam: torch.Tensor) -> np.ndarray:
    cam = cam - cam.amin(dim=(1, 2), keepdim=True)
    return (cam / (cam.amax(dim=(1, 2), keepdim=True) + 1e-7)).numpy()


def _reference_cams(model: _Probe, x: torch.Tensor, target: int) -> dict[str, np.ndarray]:
    """Grad-CAM (channel weight: mean gradient) and Grad-CAM++ (arXiv:1710.11063, eq. 19) by hand."""
    acts = model.act(model.conv(x))
    grads = torch.autograd.grad(model.head(acts.square().sum(dim=(2, 3)))[:, target].sum(), acts)[0]
    acts, grads = acts.detach(), grads.detach()
    sums = acts.sum(dim=(2, 3), keepdim=True)
    alpha = grads**2 / (2 * grads**2 + sums * grads**3 + 1e-6)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    weights = {"gradcam": grads.mean(dim=(2, 3)), "gradcam++": (grads.clamp(min=0) * alpha).sum(dim=(2, 3))}
    return {k: _minmax(torch.relu((w[:, :, None, None] * acts).sum(dim=1))) for k, w in weights.items()}


def test_each_method_name_gives_its_own_cam() -> None:
    torch.manual_seed(1)
    model = _Probe().eval()
    with torch.no_grad():
        model.head.weight[1] = torch.tensor([1.0, 0.5, -0.3, 2.0])  # channels for and against class 1
    x = torch.rand(2, 1, 32, 32)
    expected = _reference_cams(model, x, 1)
    got = {method: cam_forward(model, model.act, x, 1, method)[0] for method in sorted(CAM_METHODS)}
    for method in CAM_METHODS:
        np.testing.assert_allclose(got[method], expected[method], atol=1e-4, err_msg=method)
    assert np.abs(got["gradcam"] - got["gradcam++"]).max() > 0.1
    # and on a real architecture
    resnet, target = _frozen("resnet18")
    x = torch.randn(2, 1, 64, 64)
    gc_map, gcpp_map = (cam_forward(resnet, target, x, 1, m)[0] for m in ("gradcam", "gradcam++"))
    assert np.abs(gc_map - gcpp_map).mean() > 0.1


def _bright_detector() -> _Probe:
    """Channel 0 fires on bright pixels (> 0.5), channel 1 on dark ones; class 1 = bright minus dark."""
    model = _Probe(channels=2).eval()
    with torch.no_grad():
        model.conv.weight.zero_()
        model.conv.weight[0, 0, 1, 1], model.conv.weight[1, 0, 1, 1] = 1.0, -1.0
        model.conv.bias.copy_(torch.tensor([-0.5, 0.5]))
        model.head.weight.copy_(torch.tensor([[-1.0, 1.0], [1.0, -1.0]]))
        model.head.bias.zero_()
    return model


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
@pytest.mark.parametrize("corner", [(4, 44), (40, 8)], ids=["top-right", "bottom-left"])
def test_cam_points_at_the_evidence(method: str, corner: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    image = 0.2 + 0.02 * rng.standard_normal((64, 64))
    r, c = corner
    image[r : r + 12, c : c + 12] = 0.9  # the only bright region
    patch = np.zeros((64, 64), bool)
    patch[max(r - 1, 0) : r + 13, max(c - 1, 0) : c + 13] = True
    model = _bright_detector()
    x = torch.from_numpy(image.astype(np.float32))[None, None]
    (towards,), _, _ = cam_forward(model, model.act, x, 1, method)
    (against,), _, _ = cam_forward(model, model.act, x, 0, method)
    assert towards[patch].sum() > 0.95 * towards.sum() > 0
    assert against[patch].sum() < 0.05 * against.sum()  # class 0's evidence is the dark background


def test_cam_rejects_bad_arguments() -> None:
    model, target = _frozen("mobilenet_v2")
    with pytest.raises(ValueError, match='"method"'):
        cam_forward(model, target, torch.randn(1, 1, 32, 32), 1, "scorecam")
    with pytest.raises(ValueError, match='"x"'):
        cam_forward(model, target, torch.randn(1, 32, 32), 1)


def test_hooks_released_when_the_forward_fails() -> None:
    model, target = _frozen("mobilenet_v2")
    with pytest.raises(RuntimeError, match="to have 1 channels, but got 3 channels"):
        cam_forward(model, target, torch.randn(1, 3, 64, 64), 1)
    assert _hook_count(model) == 0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_memory_flat_over_100_calls() -> None:
    model, target = _frozen("mobilenet_v2")
    x = torch.randn(1, 1, 64, 64)
    for _ in range(10):  # warm up allocator caches
        cam_forward(model, target, x, 1)
    gc.collect()
    before = _rss_bytes()
    for _ in range(100):
        cam_forward(model, target, x, 1)
    gc.collect()
    growth = _rss_bytes() - before
    assert growth < 30 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 100 CAM calls"
    assert _hook_count(model) == 0


def test_lung_attention_values() -> None:
    heat = np.zeros((4, 4), np.float32)
    heat[0, 0], heat[3, 3] = 3.0, 1.0
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    assert lung_attention(heat, mask) == pytest.approx(0.75)
    assert lung_attention(heat, np.ones((4, 4), bool)) == pytest.approx(1.0)
    assert lung_attention(heat, np.zeros((4, 4), bool)) == 0.0
    assert lung_attention(np.zeros((4, 4), np.float32), mask) is None
    with pytest.raises(ValueError, match="same shape"):
        lung_attention(heat, np.ones((3, 3), bool))


def test_jet_and_overlay() -> None:
    assert jet(np.array([0.0]))[0].tolist() == [0, 0, 128]
    assert jet(np.array([1.0]))[0].tolist() == [128, 0, 0]
    grey = np.linspace(0, 1, 20 * 30, dtype=np.float32).reshape(20, 30)
    plain = overlay(grey, None)
    assert plain.shape == (20, 30, 3) and plain.dtype == np.uint8
    assert np.array_equal(plain[..., 0], plain[..., 2])
    heat = np.zeros_like(grey)
    heat[5:10, 5:10] = 1.0
    out = overlay(grey, heat)
    assert np.array_equal(out[15:, 15:], plain[15:, 15:])  # no heat: the radiograph unchanged
    assert not np.array_equal(out[5:10, 5:10], plain[5:10, 5:10])
    with pytest.raises(ValueError, match="same shape"):
        overlay(grey, heat[:5])
