"""Lung attention of a trained classifier on preloaded images: where Grad-CAM says the model looked.

The share of the CAM's mass inside the lung mask (``inference.explain.lung_attention``) is computed in the
classifier's own input frame: the lung crop in lung mode, the whole square in whole-image mode. A low share
means the model looks outside the lungs (borders, labels, markers): a shortcut warning.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from training.loops import as_input, protect_inplace_relu


def lung_attention_scores(model: nn.Module, arch: str, x: torch.Tensor, masks: torch.Tensor, *,
                          device: torch.device, mean: float = 0.5, std: float = 0.25,
                          method: str = "gradcam++", batch_size: int = 16) -> np.ndarray:
    """Lung attention per image (nan where the CAM is empty) for uint8 inputs ``x`` and bool ``masks``.

    ``masks`` are lung masks in the same frame and size as ``x`` (N, 1, S, S). Needs pytorch-grad-cam
    (imported here, not at module import, so training runs where it is absent until this is asked for).
    """
    from inference.explain import cam_forward, lung_attention
    from inference.models.classifiers import cam_layers

    if x.shape[0] != masks.shape[0] or x.shape[-2:] != masks.shape[-2:]:
        raise ValueError('Arguments "x" and "masks" must have the same number and size of images.')
    model.eval().to(device)
    layer, grad_layer = cam_layers(arch, model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in grad_layer.parameters():
        p.requires_grad_(True)
    out = []
    hooks = protect_inplace_relu(model)  # DenseNet's in-place ReLU after ``features`` would break backward
    try:
        for i in range(0, x.shape[0], batch_size):
            xb = as_input(x[i:i + batch_size].to(device), 1, mean, std).requires_grad_(True)
            maps = cam_forward(model, layer, xb, 1, method,
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
