"""Stage 2: COVID-19 pneumonia vs normal classifiers (torchvision architectures, no downloads).

Every classifier takes a normalised grey image (N, 1, S, S) and returns logits (N, num_classes).
The first convolution is adapted to one input channel: when initialised from a 3-channel
torchvision checkpoint its kernels are summed over the colour channels, which gives the same
response to a grey image repeated three times at a third of the first layer's cost.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

log = logging.getLogger(__name__)

CLASSIFIERS = ("densenet121", "resnet18", "mobilenet_v2")
MAX_MEMBERS = 8  # the most networks one stage 2 ensemble may hold


def _grey_conv(conv: nn.Conv2d) -> nn.Conv2d:
    new = nn.Conv2d(
        1,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        conv.stride,  # type: ignore[arg-type]
        conv.padding,  # type: ignore[arg-type]
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None and new.bias is not None:
            new.bias.copy_(conv.bias)
    return new


class _DenseNet(tvm.DenseNet):
    """torchvision's DenseNet whose final ReLU is a module (``features.relu5``), not in place.

    torchvision applies ``F.relu(..., inplace=True)`` after ``features``, which overwrites the
    tensor Grad-CAM hooks and breaks the backward pass; here the ReLU is the last feature layer
    and gives Grad-CAM a clean target. The state_dict keys are torchvision's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(out, 1))


def _densenet121(num_classes: int) -> nn.Module:
    m = _DenseNet(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64)
    m.features.conv0 = _grey_conv(m.features.conv0)
    m.features.add_module("relu5", nn.ReLU(inplace=False))
    m.classifier = nn.Linear(m.classifier.in_features, num_classes)
    return m


def _resnet18(num_classes: int) -> nn.Module:
    m = tvm.resnet18(weights=None)
    m.conv1 = _grey_conv(m.conv1)
    m.fc = nn.Linear(m.fc.in_features, num_classes)
    return m


def _mobilenet_v2(num_classes: int) -> nn.Module:
    m = tvm.mobilenet_v2(weights=None)
    m.features[0][0] = _grey_conv(m.features[0][0])
    m.classifier[-1] = nn.Linear(m.classifier[-1].in_features, num_classes)
    return m


_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "densenet121": _densenet121,
    "resnet18": _resnet18,
    "mobilenet_v2": _mobilenet_v2,
}

# Checkpoint keys of the layers replaced above (first convolution, class head).
_FIRST_CONV = {
    "densenet121": "features.conv0.weight",
    "resnet18": "conv1.weight",
    "mobilenet_v2": "features.0.0.weight",
}
CLASS_HEADS = {"densenet121": "classifier", "resnet18": "fc", "mobilenet_v2": "classifier.1"}  # module names
_HEAD_PREFIX = {name: head + "." for name, head in CLASS_HEADS.items()}
# A dense layer's key in torchvision's old naming (only inside dense layers: transitions keep "norm.weight").
_OLD_DENSE_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var))$"
)


def build_classifier(name: str, num_classes: int = 2, checkpoint: str | Path | None = None) -> nn.Module:
    """A stage 2 network by architecture name (see ``CLASSIFIERS``), one input channel.

    ``checkpoint`` is an optional local torchvision ImageNet checkpoint (a state_dict saved with
    ``torch.save`` or a ``.safetensors`` file) to initialise from; its first convolution is folded
    to one channel and its class head is skipped. Nothing is downloaded.
    """
    if name not in _BUILDERS:
        raise ValueError(f'Argument "name" must be one of {", ".join(CLASSIFIERS)}; got {name!r}.')
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError('Argument "num_classes" must be an integer of at least 2.')
    model = _BUILDERS[name](num_classes)
    if checkpoint is not None:
        load_torchvision_checkpoint(model, name, checkpoint)
    return model


def load_torchvision_checkpoint(model: nn.Module, name: str, checkpoint: str | Path) -> None:
    """Initialise ``model`` (built by :func:`build_classifier`) from a torchvision checkpoint file.

    Raises ``ValueError`` naming the file when it is missing, unreadable or does not fit the
    architecture (a missing or wrongly shaped backbone weight).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise ValueError(f'Argument "checkpoint": no such file {path}.')
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure becomes one clear message
        raise ValueError(f"checkpoint {path} cannot be read: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} does not hold a state_dict.")
    if name == "densenet121":  # torchvision's release files call a dense layer's norm1 "norm.1"
        state = {_OLD_DENSE_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    first = _FIRST_CONV[name]
    if first in state and state[first].ndim == 4 and state[first].shape[1] == 3:
        state[first] = state[first].sum(dim=1, keepdim=True)
    state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIX[name])}
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(f"checkpoint {path} does not fit {name}: shape mismatch for {', '.join(bad[:5])}.")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(_HEAD_PREFIX[name])]
    if missing:
        raise ValueError(f"checkpoint {path} does not fit {name}: missing {', '.join(missing[:5])}.")
    log.info(
        "classifier initialised from checkpoint",
        extra={"action": "classifier_checkpoint", "architecture": name, "path": str(path)},
    )


class ClassifierEnsemble(nn.Module):
    """Several stage 2 networks of one architecture answering as one: the mean of their logits.

    The members are trained apart (different seeds); averaging their logits lowers the variance of the
    answer that a single network trained on a few hundred images carries. Its state_dict keys are
    ``members.<i>.<the member's key>``.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not 2 <= len(members) <= MAX_MEMBERS:
            raise ValueError(f'Argument "members" must hold 2 to {MAX_MEMBERS} networks; got {len(members)}.')
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)


def build_stage2(name: str, members: int = 1, num_classes: int = 2) -> nn.Module:
    """A stage 2 network (``members`` = 1) or a :class:`ClassifierEnsemble` of ``members`` of them."""
    if not isinstance(members, int) or isinstance(members, bool) or not 1 <= members <= MAX_MEMBERS:
        raise ValueError(f'Argument "members" must be an integer from 1 to {MAX_MEMBERS}; got {members!r}.')
    if members == 1:
        return build_classifier(name, num_classes)
    return ClassifierEnsemble([build_classifier(name, num_classes) for _ in range(members)])


def equalize(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Histogram-equalise each image of a normalised batch ``x`` (N, C, H, W): every pixel becomes the share
    of the image's pixels at or below its value, so two images whose grey levels differ by an increasing
    mapping (contrast, brightness, gamma, window, a site's look-up table) give the same result.

    Pixels within 1/512 of the image's darkest value are its background: the padding of ``square_resize``,
    what lies outside the lungs in lung mode, black film borders; they stay black (0) and do not count.
    ``mean`` and ``std`` are the normalisation ``x`` was made with (x = (image - mean) / std, image in
    [0, 1]); the result is normalised the same way.
    """
    if x.ndim != 4:
        raise ValueError(f'Argument "x" must have shape (N, C, H, W); got {tuple(x.shape)}.')
    flat = x.detach().float().reshape(x.shape[0], -1)
    background = flat <= flat.min(dim=1, keepdim=True).values + (1.0 / 512.0) / std
    key = flat.masked_fill(background, float("-inf"))
    at_or_below = torch.searchsorted(key.sort(dim=1).values, key, right=True)
    n_background = background.sum(dim=1, keepdim=True)
    n_image = (flat.shape[1] - n_background).clamp(min=1)
    share = ((at_or_below - n_background).float() / n_image).masked_fill(background, 0.0)
    return ((share - mean) / std).reshape(x.shape).to(x.dtype)


class EqualizeInput:
    """A forward pre-hook that feeds a network :func:`equalize`'d inputs (see :func:`equalize_inputs`)."""

    def __init__(self, mean: float, std: float) -> None:
        self.mean, self.std = float(mean), float(std)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (equalize(args[0], self.mean, self.std), *args[1:])


def equalize_inputs(model: nn.Module, mean: float, std: float) -> nn.Module:
    """Make every network in ``model`` (one network, or each member of an ensemble) histogram-equalise its
    input before its first layer (:func:`equalize`), in training, inference and Grad-CAM alike; returns
    ``model``. The weights are unchanged (the bundle card records the setting: ``normalisation.equalize``).
    Calling it again on an equalising network changes nothing."""
    for m in members_of(model):
        if not is_equalizing(m):
            m.register_forward_pre_hook(EqualizeInput(mean, std))
    return model


def is_equalizing(model: nn.Module) -> bool:
    """Whether every network in ``model`` equalises its input (:func:`equalize_inputs`)."""
    return all(any(isinstance(h, EqualizeInput) for h in m._forward_pre_hooks.values())
               for m in members_of(model))


def members_of(model: nn.Module) -> list[nn.Module]:
    """The single networks inside ``model``: its members for an ensemble, else ``[model]``."""
    return list(model.members) if isinstance(model, ClassifierEnsemble) else [model]


def prepare_cam(name: str, model: nn.Module) -> list[nn.Module]:
    """Freeze ``model`` (one network or an ensemble) for Grad-CAM and return each member's target layer.

    Only the parameters of each member's gradient layer (:func:`cam_layers`) keep ``requires_grad``, so the
    CAM's backward pass covers just the networks' heads.
    """
    pairs = [cam_layers(name, m) for m in members_of(model)]
    for p in model.parameters():
        p.requires_grad_(False)
    for _, grad_layer in pairs:
        for p in grad_layer.parameters():
            p.requires_grad_(True)
    return [target for target, _ in pairs]


def cam_layers(name: str, model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(target layer for Grad-CAM, the layer whose parameters must carry gradients for it).

    Only the second layer's parameters need ``requires_grad`` for the CAM's backward pass, so the
    pipeline freezes everything else and back-propagates only through the network's head.
    """
    m: Any = model
    if name == "densenet121":
        return m.features.relu5, m.features.norm5
    if name == "resnet18":
        return m.layer4[-1], m.layer4[-1]
    if name == "mobilenet_v2":
        return m.features[-1], m.features[-1]
    raise ValueError(f'Argument "name" must be one of {", ".join(CLASSIFIERS)}; got {name!r}.')
