"""Lung attention of a trained classifier on preloaded images: where Grad-CAM says the model looked.

The share of the CAM's mass inside the lung mask (``inference.explain.lung_attention``) is computed in the
classifier's own input frame: the lung crop in lung mode, the whole square in whole-image mode. A low share
means the model looks outside the lungs (borders, labels, markers): a shortcut warning.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.loops import as_input, protect_inplace_relu


def lung_attention_scores(model: nn.Module, arch: str, x: torch.Tensor, masks: torch.Tensor, *,
                          device: torch.device, mean: float = 0.5, std: float = 0.25,
                          method: str = "gradcam++", batch_size: int = 16) -> np.ndarray:
    """Lung attention per image (nan where the CAM is empty) for uint8 inputs ``x`` and bool ``masks``.

    ``model`` is one network or a ``ClassifierEnsemble`` of ``arch`` networks.
    ``masks`` are lung masks in the same frame and size as ``x`` (N, 1, S, S). Needs pytorch-grad-cam
    (imported here, not at module import, so training runs where it is absent until this is asked for).
    """
    from inference.explain import explain_forward, lung_attention
    from inference.models.classifiers import members_of, prepare_cam

    if x.shape[0] != masks.shape[0] or x.shape[-2:] != masks.shape[-2:]:
        raise ValueError('Arguments "x" and "masks" must have the same number and size of images.')
    model.eval().to(device)
    layers = prepare_cam(arch, model)
    out = []
    # DenseNet's in-place ReLU after ``features`` would break backward
    hooks = [h for member in members_of(model) for h in protect_inplace_relu(member)]
    try:
        for i in range(0, x.shape[0], batch_size):
            xb = as_input(x[i:i + batch_size].to(device), 1, mean, std).requires_grad_(True)
            maps = explain_forward(model, layers, xb, 1, method,
                                   torch.bfloat16 if device.type == "cuda" else None)[0]
            for j, cam in enumerate(maps):
                m = masks[i + j, 0].cpu().numpy().astype(bool)
                a = lung_attention(cam, m)
                out.append(np.nan if a is None else a)
    finally:
        for h in hooks:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(True)
    return np.asarray(out, dtype=np.float64)


def head_linear(model: nn.Module) -> nn.Linear:
    """The class head: the last ``nn.Linear`` of a torchvision classifier (global pooling + linear)."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError("the model has no linear class head")
    return last


def gradcampp_maps(features: torch.Tensor, weight: torch.Tensor, target: int) -> torch.Tensor:
    """Grad-CAM++ maps (N, h, w) of class ``target``, differentiable, from the CAM layer's activations.

    For a network whose CAM layer is followed only by global average pooling and a linear head (the three
    classifiers here), the gradient of logit ``target`` with respect to every activation of channel k is
    ``weight[target, k] / (h * w)``, so pytorch-grad-cam's Grad-CAM++ weights have a closed form; this is that
    form, before its min-max scaling and resize.
    """
    a = features.float()
    n, k, h, w = a.shape
    g = (weight[target].float() / (h * w)).view(1, k)
    g2 = g * g
    alpha = g2 / (2 * g2 + a.sum(dim=(2, 3)) * g2 * g + 1e-6)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    wk = torch.relu(g) * alpha * (h * w)
    return torch.relu(torch.einsum("nk,nkhw->nhw", wk, a))


def outside_share(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per image, the share of a CAM's mass outside the lung mask, as ``inference.explain.lung_attention``
    measures it: the map (N, h, w) is shifted to a minimum of 0 and resized bilinearly to the mask's size
    (N, 1, S, S). An empty map counts as entirely outside."""
    up = F.interpolate(maps[:, None], size=masks.shape[-2:], mode="bilinear", align_corners=False)
    up = up - up.amin(dim=(2, 3), keepdim=True)
    total = up.sum(dim=(1, 2, 3))
    inside = (up * masks.to(up.dtype)).sum(dim=(1, 2, 3))
    return 1.0 - inside / total.clamp_min(1e-6)


def attention_loss(features: torch.Tensor, head: nn.Linear, masks: torch.Tensor) -> torch.Tensor:
    """Mean share of both classes' Grad-CAM++ mass outside the lungs: a training penalty that asks the
    classifier to find its evidence, for either answer, inside the lung fields."""
    shares = [outside_share(gradcampp_maps(features, head.weight, c), masks)
              for c in range(head.out_features)]
    return torch.stack(shares).mean()
