"""Explanations of stage 2: Grad-CAM / Grad-CAM++ heatmaps, lung attention, and overlays.

The CAM object is always used inside ``with``, so pytorch-grad-cam's forward hooks are removed
even when the computation fails. The same forward pass that the CAM needs gives the logits, so
stage 2 runs once per batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import numpy as np
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from inference.models.classifiers import members_of

CAM_METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}


def _as_float(t: torch.Tensor) -> torch.Tensor:
    # Under bf16/fp16 autocast activations and gradients are half precision, which NumPy cannot hold.
    return t.float()


def cam_forward(
    model: nn.Module,
    target_layer: nn.Module,
    x: torch.Tensor,
    target_index: int,
    method: str = "gradcam++",
    autocast_dtype: torch.dtype | None = None,
    sync: Callable[[], None] | None = None,
) -> tuple[np.ndarray, torch.Tensor, float]:
    """One forward and backward pass: CAMs, logits and the forward pass's seconds.

    Returns float32 CAMs (N, S, S) in [0, 1], float32 logits (N, classes), and the time the
    forward pass took (the rest of the call is the CAM). ``target_index`` is the class whose score
    the CAM explains; ``autocast_dtype`` enables autocast with that dtype on the input's device;
    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before reading the clock. Parameter
    gradients are cleared afterwards.
    """
    if method not in CAM_METHODS:
        raise ValueError(f'Argument "method" must be one of {", ".join(CAM_METHODS)}; got {method!r}.')
    if x.ndim != 4:
        raise ValueError('Argument "x" must have shape (N, C, H, W).')
    targets = [ClassifierOutputTarget(target_index)] * x.shape[0]
    amp = (
        torch.autocast(device_type=x.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else nullcontext()
    )
    marks: list[float] = []

    def forward_done(*_: object) -> None:
        if sync is not None:
            sync()
        marks.append(time.perf_counter())

    t0 = time.perf_counter()
    handle = model.register_forward_hook(forward_done)
    try:
        with (
            torch.enable_grad(),
            amp,
            CAM_METHODS[method](
                model=model, target_layers=[target_layer], reshape_transform=_as_float
            ) as cam,
        ):
            maps = cam(input_tensor=x, targets=targets)
            logits = cam.outputs.detach().float()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    return np.asarray(maps, dtype=np.float32), logits, (marks[0] if marks else t0) - t0


def explain_forward(
    model: nn.Module,
    target_layers: Sequence[nn.Module],
    x: torch.Tensor,
    target_index: int,
    method: str = "gradcam++",
    autocast_dtype: torch.dtype | None = None,
    sync: Callable[[], None] | None = None,
) -> tuple[np.ndarray, torch.Tensor, float]:
    """:func:`cam_forward` for one network or a ``ClassifierEnsemble`` (``target_layers``: one per member).

    An ensemble is explained member by member: its logits are the mean of the members' logits (as its
    forward computes them) and its heatmap the mean of the members' min-max scaled heatmaps, scaled again,
    which is how pytorch-grad-cam joins the maps of several target layers.
    """
    members = members_of(model)
    if len(target_layers) != len(members):
        raise ValueError(
            f'Argument "target_layers" must hold one layer per member ({len(members)}); '
            f"got {len(target_layers)}."
        )
    if len(members) == 1:
        return cam_forward(model, target_layers[0], x, target_index, method, autocast_dtype, sync)
    parts = [
        cam_forward(m, layer, x, target_index, method, autocast_dtype, sync)
        for m, layer in zip(members, target_layers, strict=True)
    ]
    maps = scale_cam_image(np.mean([p[0] for p in parts], axis=0))
    logits = torch.stack([p[1] for p in parts]).mean(dim=0)
    return np.asarray(maps, dtype=np.float32), logits, sum(p[2] for p in parts)


def lung_attention(heatmap: np.ndarray, lung_mask: np.ndarray) -> float | None:
    """Share of the heatmap's mass inside the lung mask, in [0, 1]; None when the heatmap is empty."""
    if heatmap.shape != lung_mask.shape:
        raise ValueError('Arguments "heatmap" and "lung_mask" must have the same shape.')
    inside = float(heatmap[lung_mask].sum(dtype=np.float64))
    return attention_ratio(inside, float(heatmap.sum(dtype=np.float64)))


def attention_ratio(inside: float, total: float) -> float | None:
    """``inside / total`` clipped to [0, 1]; None when the heatmap's total mass is not positive."""
    if total <= 0.0:
        return None
    return min(1.0, max(0.0, inside / total))


def jet(values: np.ndarray) -> np.ndarray:
    """The classic 'jet' colour map: float array in [0, 1] -> uint8 RGB (..., 3)."""
    v = np.clip(values, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * v - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * v - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * v - 1.0), 0.0, 1.0)
    return (np.stack([r, g, b], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def overlay(grey: np.ndarray, heatmap: np.ndarray | None, alpha: float = 0.4) -> np.ndarray:
    """The radiograph (float [0, 1]) as RGB uint8 with the heatmap blended over it in 'jet' colours.

    The blend weight grows with the heat, so cold regions show the plain radiograph.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError('Argument "alpha" must be between 0 and 1.')
    base = np.repeat(np.clip(grey, 0.0, 1.0)[..., None], 3, axis=-1).astype(np.float32)
    if heatmap is None:
        return (base * 255.0 + 0.5).astype(np.uint8)
    if heatmap.shape != grey.shape:
        raise ValueError('Arguments "grey" and "heatmap" must have the same shape.')
    h = np.clip(heatmap, 0.0, 1.0).astype(np.float32)[..., None]
    w = alpha * np.sqrt(h)
    out = base * (1.0 - w) + (jet(h[..., 0]).astype(np.float32) / 255.0) * w
    return (out * 255.0 + 0.5).astype(np.uint8)
