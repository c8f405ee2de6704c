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
