"""Training loops for both stages on preloaded tensors: one :func:`fit` for segmenters and classifiers.

Data are whole tensors in memory (uint8, N x 1 x S x S) moved to the device once; batches are augmented there
(:mod:`training.augment`). Adam (lr 0.002 by default), class-balanced cross-entropy for classifiers
(optionally also balanced across the sources within each class, :func:`sample_weights`),
BCE + soft Dice for segmenters, one-cycle learning-rate schedule, early stopping on the validation score
(ROC AUC / Dice), bf16 autocast on CUDA, fixed seeds with deterministic kernels, periodic checkpoints and
resume from them.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dicom_node.errors import TrainingDiverged
from training.augment import augment

log = logging.getLogger(__name__)

Kind = Literal["segmentation", "classification"]
F_ = TypeVar("F_", bound=Callable[..., Any])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_deterministic_kernels(on: bool = True) -> None:
    """Make torch choose deterministic kernels (cuDNN and cuBLAS included), so that one seed on one GPU gives
    one network; or leave the choice to speed (``on=False``: cuDNN's autotuner may pick a different kernel run
    by run).

    Ops without a deterministic CUDA kernel still run and warn once, naming themselves. cuBLAS reads its
    workspace setting when it starts, so it is set here only if the process has not set it (before its first
    matrix product on the GPU). Process-wide: :func:`keeps_kernel_settings` restores the earlier choice.
    """
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on
    torch.use_deterministic_algorithms(on, warn_only=True)


def keeps_kernel_settings(fn: F_) -> F_:
    """Decorate ``fn`` so that the process's kernel choices (:func:`use_deterministic_kernels`) are as they
    were once it returns or raises."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        saved = (torch.are_deterministic_algorithms_enabled(),
                 torch.is_deterministic_algorithms_warn_only_enabled(),
                 torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]

    return wrapper  # type: ignore[return-value]


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU raises ``RuntimeError``."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError('Argument "device" must be auto, cpu or cuda.')
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda requested but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def in_channels(model: nn.Module) -> int:
    """Input channels of the model's first convolution (1 or 3)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return 1


def as_input(x_uint8: torch.Tensor, channels: int, mean: float, std: float) -> torch.Tensor:
    """uint8 (N,1,H,W) or float in [0,1] -> normalised float (N,channels,H,W)."""
    x = x_uint8.float() / 255.0 if x_uint8.dtype == torch.uint8 else x_uint8.float()
    x = (x - mean) / std
    return x.expand(-1, channels, -1, -1) if channels != x.shape[1] else x


def logits_of(out: object) -> torch.Tensor:
    """The logits tensor of a model output (a tensor, a tuple whose first item is it, or a dict 'logits')."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out["logits"]
    if isinstance(out, tuple | list):
        return out[0]
    raise TypeError(f"unexpected model output type {type(out).__name__}")


def class_probability(logits: torch.Tensor) -> torch.Tensor:
    """P(class 1) from (N,2) softmax logits or (N,1)/(N,) sigmoid logits."""
    logits = logits.float()
    if logits.ndim == 2 and logits.shape[1] == 2:
        return logits.softmax(1)[:, 1]
    return torch.sigmoid(logits.reshape(-1))


def sample_weights(y: torch.Tensor, groups: torch.Tensor, power: float) -> torch.Tensor:
    """Per-sample loss weights (N,) that balance the classes and, within each class, the groups (sources).

    A sample of a group with ``n`` images of its class weighs ``n ** -power`` before each class is scaled to
    half of the total weight: ``power=0`` is plain class balancing, ``power=1`` gives every source of a class
    the same total weight, ``0.5`` lies between (a source 100 times larger weighs 10 times more in all).
    Used so that a source holding most of one class (here: the normals, mostly from one hospital) does not
    make the other sources' style a cue for the other class.
    """
    if y.shape != groups.shape or y.ndim != 1:
        raise ValueError("y and groups must be 1-D tensors of the same length")
    if not 0.0 <= power <= 1.0:
        raise ValueError('Argument "power" must be from 0 to 1.')
    w = torch.zeros(y.shape[0], dtype=torch.float64)
    for cls in y.unique():
        in_cls = y == cls
        g = groups[in_cls]
        _, inverse, counts = g.unique(return_inverse=True, return_counts=True)
        wc = counts.double().pow(-power)[inverse]
        w[in_cls] = wc / wc.sum() * (y.shape[0] / 2)
    return w.float()


def _cls_loss(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
              per_sample: torch.Tensor | None = None) -> torch.Tensor:
    """Class-weighted cross-entropy, or with ``per_sample`` weights the weighted mean over the batch."""
    logits = logits.float()
    if per_sample is not None:
        if logits.ndim == 2 and logits.shape[1] == 2:
            losses = F.cross_entropy(logits, y, reduction="none")
        else:
            losses = F.binary_cross_entropy_with_logits(logits.reshape(-1), y.float(), reduction="none")
        return (losses * per_sample).sum() / per_sample.sum()
    if logits.ndim == 2 and logits.shape[1] == 2:
        return F.cross_entropy(logits, y, weight=weights)
    pos_weight = weights[1] / weights[0]
    return F.binary_cross_entropy_with_logits(logits.reshape(-1), y.float(), pos_weight=pos_weight)


def _seg_step(model: nn.Module, xb: torch.Tensor, target: torch.Tensor,
              generator: torch.Generator | None) -> torch.Tensor:
    """Forward + loss of one segmentation batch; lungvae-style models train on corrupted inputs."""
    from inference.models.segmentation import corrupt_for_imputation, lungvae_loss, segmentation_loss

    forward_train: Any = getattr(model, "forward_train", None)
    if forward_train is not None:
        gen = generator if generator is not None and generator.device.type == "cpu" else None
        out = forward_train(corrupt_for_imputation(xb, generator=gen))
        return lungvae_loss(out, target, xb)["total"].float()
    return segmentation_loss(logits_of(model(xb)).float(), target)


@dataclass
class FitConfig:
    """Hyper-parameters of one training run."""

    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.002
    weight_decay: float = 1e-4
    patience: int = 8  # epochs without a better validation score before stopping
    seed: int = 0
    mean: float = 0.5  # input normalisation (recorded in the bundle card)
    std: float = 0.25
    augment: bool = True
    max_steps: int = 0  # >0: stop each epoch after this many batches (tests)
    checkpoint_every: int = 5  # epochs between checkpoints (the last epoch is always saved)
    attention_weight: float = 0.0  # >0: add this times the CAM mass outside the lungs (needs train masks)
    source_balance: float = 0.0  # >0: also balance sources within each class (sample_weights; needs groups)
    style_augment: float = 0.0  # >0: probability of each texture degradation per image (training.augment)
    source_adversary: float = 0.0  # >0: weight of a class-conditional source adversary (training.adversary)
    artefact_augment: float = 0.0  # >0: probability of each source mark per image (training.artefacts)
    deterministic: bool = True  # deterministic kernels (use_deterministic_kernels): one seed, one network

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f'Argument "{name}" must be at least 1.')
        if not self.lr > 0:
            raise ValueError('Argument "lr" must be positive.')
        if not self.attention_weight >= 0:
            raise ValueError('Argument "attention_weight" must not be negative.')
        if not 0.0 <= self.source_balance <= 1.0:
            raise ValueError('Argument "source_balance" must be from 0 to 1.')
        if not 0.0 <= self.style_augment <= 1.0:
            raise ValueError('Argument "style_augment" must be from 0 to 1.')
        if not 0.0 <= self.artefact_augment <= 1.0:
            raise ValueError('Argument "artefact_augment" must be from 0 to 1.')
        if not self.source_adversary >= 0:
            raise ValueError('Argument "source_adversary" must not be negative.')


@dataclass
class FitResult:
    """What :func:`fit` returns: the best weights (on validation) and the history."""

    state: dict[str, torch.Tensor]
    best_score: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def _progress(iterable: range, desc: str, enabled: bool | None) -> object:
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty() and not os.environ.get("CI")
    return tqdm(iterable, desc=desc, disable=not enabled, leave=False)


def predict(model: nn.Module, x: torch.Tensor, *, kind: Kind, device: torch.device, mean: float, std: float,
            batch_size: int = 64) -> torch.Tensor:
    """Probabilities for a uint8 tensor ``x``: P(covid) per image (N,) or lung probability maps (N,1,H,W).

    The model moves to ``device`` before inference mode: parameters copied inside it would be inference
    tensors, which a later Grad-CAM (``prepare_cam``) or fine-tuning of the same model cannot use.
    """
    with torch.inference_mode(False):
        model.eval().to(device)
    ch = in_channels(model)
    outs = []
    with torch.inference_mode():
        for i in range(0, x.shape[0], batch_size):
            xb = as_input(x[i:i + batch_size].to(device, non_blocking=True), ch, mean, std)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = logits_of(model(xb))
            outs.append((class_probability(logits) if kind == "classification"
                         else torch.sigmoid(logits.float())).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def protect_inplace_relu(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Hook the final non-inplace ReLU of a ``features`` block to return a copy.

    torchvision's DenseNet applies ``F.relu(..., inplace=True)`` after ``features``; when ``features`` ends in
    its own ReLU (kept for Grad-CAM), the in-place op would overwrite the tensor that ReLU's backward needs.
    Returning a copy from the hook keeps training correct and leaves the weights and module names unchanged.
    """
    features = getattr(model, "features", None)
    last = list(features.children())[-1] if isinstance(features, nn.Sequential) and len(features) else None
    if isinstance(last, nn.ReLU) and not last.inplace:
        return [last.register_forward_hook(lambda _m, _i, out: out.clone())]
    return []


def _rng_state(gen: torch.Generator, cpu_gen: torch.Generator) -> dict[str, Any]:
    """The random states a training run draws from: its shuffling/augmentation generator, the CPU generator of
    the LungVAE's corruption, and torch's global generators (the LungVAE's latent samples)."""
    state = {"gen": gen.get_state(), "cpu_gen": cpu_gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: dict[str, Any], gen: torch.Generator, cpu_gen: torch.Generator) -> None:
    gen.set_state(state["gen"].cpu())
    cpu_gen.set_state(state["cpu_gen"].cpu())
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(state["cuda"].cpu()))


def _check_finite(model: nn.Module, loss: float, prob: torch.Tensor, name: str, epoch: int,
                  lr: float) -> None:
    """Raise :class:`TrainingDiverged` when the epoch's loss, the weights (parameters and buffers, e.g.
    BatchNorm's running statistics) or the validation predictions are not finite: a clear stop with the
    epoch and the learning rate instead of a failure further on (in the score, or when the bundle is
    loaded)."""
    what = None
    if not math.isfinite(loss):
        what = f"loss {loss}"
    else:
        bad = next((k for k, v in model.state_dict().items()
                    if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
        if bad is not None:
            what = f"weights ({bad})"
        elif not bool(torch.isfinite(prob).all()):
            what = "validation predictions"
    if what is not None:
        raise TrainingDiverged(f"{name}: training diverged in epoch {epoch + 1}: {what} not finite; "
                               f"try a lower learning rate than {lr:g}")


def _val_score(kind: Kind, prob: torch.Tensor, y: torch.Tensor) -> float:
    if kind == "classification":
        from sklearn.metrics import roc_auc_score

        yy = y.numpy()
        if len(np.unique(yy)) < 2:
            return float(-F.binary_cross_entropy(prob.clamp(1e-6, 1 - 1e-6), y.float()))
        return float(roc_auc_score(yy, prob.numpy()))
    pred = (prob > 0.5).float()
    t = y.float()
    inter = (pred * t).sum(dim=(1, 2, 3))
    return float(((2 * inter + 1e-6) / (pred.sum(dim=(1, 2, 3)) + t.sum(dim=(1, 2, 3)) + 1e-6)).mean())


@keeps_kernel_settings
def fit(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], *,
        kind: Kind, config: FitConfig, device: torch.device, checkpoint: Path | None = None,
        resume: bool = False, progress: bool | None = None, name: str = "",
        on_epoch: Callable[[dict[str, float]], None] | None = None,
        train_masks: torch.Tensor | None = None, cam_layer: nn.Module | None = None,
        groups: torch.Tensor | None = None) -> FitResult:
    """Train ``model`` on ``train`` = (x uint8 (N,1,S,S), y) and keep the weights best on ``val``.

    ``y`` is a long tensor of class ids (classification) or a uint8 mask tensor (N,1,S,S) (segmentation).
    With ``checkpoint`` the full training state is saved every ``checkpoint_every`` epochs and at the end;
    ``resume=True`` continues from it.
    With ``config.attention_weight > 0`` (classification only) ``train_masks`` are the training images'
    lung masks in the input frame (N,1,S,S) and ``cam_layer`` the Grad-CAM layer: the loss adds the weighted
    share of the Grad-CAM++ mass outside the lungs (:func:`training.attention.attention_loss`), so the
    classifier learns to look at the lungs rather than at borders, labels or markers.
    With ``config.source_balance > 0`` (classification only) ``groups`` holds each training image's source id
    (N,) and the loss weighs images by :func:`sample_weights` instead of by class alone.
    With ``config.source_adversary > 0`` (classification only, ``groups`` as above, at least two sources) the
    loss adds that weight (ramped up from 0 over training) times the loss of a source adversary on the pooled
    features, whose gradient reaches the network reversed (:mod:`training.adversary`): features stop telling
    sources apart within a class.
    Returns the best state dict (CPU tensors), its validation score and epoch, and the per-epoch history.
    Raises :class:`~dicom_node.errors.TrainingDiverged` (naming the epoch and the learning rate) as soon as an
    epoch leaves a non-finite loss, weight or validation prediction; nothing of that epoch is checkpointed.
    """
    if kind not in ("segmentation", "classification"):
        raise ValueError('Argument "kind" must be segmentation or classification.')
    if train[0].shape[0] == 0 or val[0].shape[0] == 0:
        raise ValueError(f"{name or kind}: empty training or validation set")
    guided = kind == "classification" and config.attention_weight > 0
    if guided and (train_masks is None or cam_layer is None or train_masks.shape[0] != train[0].shape[0]
                   or train_masks.shape[-2:] != train[0].shape[-2:]):
        raise ValueError(f"{name or kind}: attention_weight needs cam_layer and one lung mask per "
                         "training image")
    balanced = kind == "classification" and config.source_balance > 0
    adversarial = kind == "classification" and config.source_adversary > 0
    for option, on in (("source_balance", balanced), ("source_adversary", adversarial)):
        if on and (groups is None or groups.shape != (train[0].shape[0],)):
            raise ValueError(f"{name or kind}: {option} needs one group id per training image")
    if adversarial and groups is not None and groups.unique().numel() < 2:
        raise ValueError(f"{name or kind}: source_adversary needs at least two groups")
    if adversarial and sum(isinstance(m, nn.Linear) for m in model.modules()) > 1:
        raise ValueError(f"{name or kind}: source_adversary needs a network with one linear class head "
                         "(not an ensemble)")
    t0 = time.perf_counter()
    seed_everything(config.seed)
    use_deterministic_kernels(config.deterministic)
    model.to(device)
    hooks = protect_inplace_relu(model)
    captured: list[torch.Tensor] = []
    if guided:
        from training.attention import attention_loss, head_linear

        head = head_linear(model)
        assert cam_layer is not None and train_masks is not None
        hooks.append(cam_layer.register_forward_hook(
            lambda m, _i, out: captured.append(out) if m.training else None))
        mt = train_masks.to(device)
    adversary, pooled = None, []
    if adversarial:
        from training.adversary import SourceAdversary, adversary_loss
        from training.attention import head_linear

        assert groups is not None
        last = head_linear(model)
        adversary = SourceAdversary(last.in_features, int(groups.max()) + 1).to(device)
        hooks.append(last.register_forward_pre_hook(
            lambda m, inp: pooled.append(inp[0]) if m.training else None))
        gt = groups.to(device)
        adv_weights = sample_weights(train[1].cpu(), groups.cpu(), 1.0).to(device)
    ch = in_channels(model)
    xt, yt = train[0].to(device), train[1].to(device)
    params = list(model.parameters()) + ([] if adversary is None else list(adversary.parameters()))
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(xt.shape[0] / config.batch_size)
    if config.max_steps:
        steps_per_epoch = min(steps_per_epoch, config.max_steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.15)
    weights = torch.ones(2, device=device)
    if kind == "classification":
        counts = torch.bincount(yt, minlength=2).float().clamp(min=1)
        weights = counts.sum() / (2 * counts)
    per_sample = None
    if balanced:
        assert groups is not None
        per_sample = sample_weights(train[1].cpu(), groups.cpu(), config.source_balance).to(device)
    gen = torch.Generator(device=device).manual_seed(config.seed)
    cpu_gen = torch.Generator().manual_seed(config.seed)
    best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    best_score, best_epoch, start, history = -math.inf, -1, 0, []
    if resume and checkpoint is not None and checkpoint.is_file():
        ck = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(ck["model"])
        if adversary is not None:
            adversary.load_state_dict(ck["adversary"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        best_state, best_score, best_epoch = ck["best_state"], float(ck["best_score"]), int(ck["best_epoch"])
        start, history = int(ck["epoch"]) + 1, [dict(h) for h in ck["history"]]
        if ck.get("finished"):
            start = config.epochs
        if "rng" in ck:  # every random draw continues where the interrupted run left it
            _set_rng_state(ck["rng"], gen, cpu_gen)
        else:  # a checkpoint written before the random states were saved
            gen.manual_seed(config.seed + start)
        log.info("resumed", extra={"action": "train_resume", "run": name, "epoch": start})
    for epoch in _progress(range(start, config.epochs), name or kind, progress):  # type: ignore[attr-defined]
        model.train()
        if adversary is not None:
            adversary.train()
        perm = torch.randperm(xt.shape[0], device=device, generator=gen)
        total, seen = 0.0, 0
        for step in range(steps_per_epoch):
            idx = perm[step * config.batch_size:(step + 1) * config.batch_size]
            if idx.numel() < 2 and kind == "classification" and step > 0:
                continue  # BatchNorm cannot train on a single sample
            xb = xt[idx].float() / 255.0
            yb = yt[idx]
            mb = yb.float() if kind == "segmentation" else mt[idx].float() if guided else None
            if config.augment:
                xb, mb = augment(xb, mb, generator=gen, style=config.style_augment,
                                 artefacts=config.artefact_augment)
            xb = as_input(xb, ch, config.mean, config.std)
            captured.clear()
            pooled.clear()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                if kind == "classification":
                    loss = _cls_loss(logits_of(model(xb)), yb, weights,
                                     None if per_sample is None else per_sample[idx])
                    if guided:
                        assert mb is not None
                        loss = loss + config.attention_weight * attention_loss(captured[-1], head, mb)
                    if adversary is not None:  # weight ramped up from 0 as in Ganin & Lempitsky (2015)
                        done = (epoch * steps_per_epoch + step) / max(1, config.epochs * steps_per_epoch)
                        ramp = 2.0 / (1.0 + math.exp(-10.0 * done)) - 1.0
                        loss = loss + config.source_adversary * ramp * adversary_loss(
                            adversary, pooled[-1], yb, gt[idx], adv_weights[idx])
                else:
                    loss = _seg_step(model, xb, mb, cpu_gen)  # type: ignore[arg-type]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * idx.numel()
            seen += idx.numel()
        prob = predict(model, val[0], kind=kind, device=device, mean=config.mean, std=config.std)
        _check_finite(model, total, prob, name or kind, epoch, config.lr)
        score = _val_score(kind, prob, val[1].cpu())
        row = {"epoch": float(epoch), "loss": total / max(seen, 1), "val_score": score,
               "lr": float(sched.get_last_lr()[0])}
        history.append(row)
        if score > best_score:
            best_score, best_epoch = score, epoch
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        log.info("epoch", extra={"action": "train_epoch", "run": name, **row})
        if on_epoch is not None:
            on_epoch(row)
        stopping = epoch - best_epoch >= config.patience or epoch == config.epochs - 1
        if checkpoint is not None and (stopping or (epoch + 1) % max(1, config.checkpoint_every) == 0):
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        **({} if adversary is None else {"adversary": adversary.state_dict()}),
                        "scheduler": sched.state_dict(), "best_state": best_state, "best_score": best_score,
                        "best_epoch": best_epoch, "epoch": epoch, "history": history,
                        "rng": _rng_state(gen, cpu_gen)}, tmp)
            tmp.replace(checkpoint)
        if epoch - best_epoch >= config.patience:
            log.info("early stop", extra={"action": "train_early_stop", "run": name, "epoch": epoch})
            break
    if checkpoint is not None and checkpoint.is_file():
        ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if not ck.get("finished"):
            ck["finished"] = True
            torch.save(ck, checkpoint)
    for handle in hooks:
        handle.remove()
    model.load_state_dict(best_state)
    return FitResult(state=best_state, best_score=best_score, best_epoch=best_epoch, history=history,
                     seconds=time.perf_counter() - t0)
