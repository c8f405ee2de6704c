"""``cxr-node pretrain``: self-supervised pretraining of a stage 2 network on unlabelled radiographs.

Stage 2 is otherwise trained from random weights on a few hundred labelled images (no ImageNet weights are
downloaded). This command learns a starting point from the images alone (labels only choose which images are
used, and score the check below), by contrastive learning (SimCLR: Chen et al. 2020): two random views of each
image must map to nearby points and away from the other images of the batch (the NT-Xent loss on a small
projection head). The views differ by the node's own augmentation (rotation, zoom, shift, brightness,
contrast, gamma) made stronger, by texture degradations (blur, sharpening, noise) and by the marks of a
film's source (padding bars, printed markers, histogram equalisation, sharpening), so the features learnt do
not change when only those change.

Images used: every classification image (``covid``, ``normal`` and ``other`` by default) whose patient is
not on the validation or test side of ``--split``, so nothing measured later was seen, not even unlabelled.
The result, ``<out>/encoder.safetensors``, is the network without its class head in torchvision's layout;
give it to ``cxr-node train --init-weights`` or ``python -m training.build_default --init-weights``.
Beside it, ``pretrain.json`` records the images per source and label, the loss per epoch, and a
k-nearest-neighbour check of the features before and after: the validation images scored by the labels of
their nearest training images (ROC AUC over all, and within sources).

    cxr-node pretrain --data ../shared/data --split runs/r1/split.json --arch resnet18 --out runs/ssl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inference.models.classifiers import CLASS_HEADS
from training.augment import augment
from training.datasets import CLASS_LABELS, Sample, load_data, load_split
from training.loops import keeps_kernel_settings, use_deterministic_kernels

HEADS = CLASS_HEADS  # the class head each backbone() replaces by the identity


@dataclass
class PretrainConfig:
    """Hyper-parameters of one pretraining run."""

    epochs: int = 40
    batch_size: int = 64  # images per step (two views each)
    lr: float = 0.001  # AdamW, one epoch of warm-up then cosine decay
    weight_decay: float = 1e-4
    temperature: float = 0.2  # of the NT-Xent loss
    style: float = 0.5  # probability of each texture degradation per view
    artefacts: float = 0.5  # probability of each source mark per view
    seed: int = 0
    mean: float = 0.5  # input normalisation, as stage 2's (training.loops.FitConfig)
    std: float = 0.25
    max_steps: int = 0  # >0: stop each epoch after this many steps (tests)
    checkpoint_every: int = 5
    time_budget: float = 0.0  # >0: seconds; the first epoch's time cuts the epochs to fit (cosine decay too)
    deterministic: bool = True  # deterministic kernels (training.loops.use_deterministic_kernels)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f'Argument "{name}" must be at least 1.')
        if self.batch_size < 2:
            raise ValueError('Argument "batch_size" must be at least 2 (the other images are the negatives).')
        if self.time_budget < 0:
            raise ValueError('Argument "time_budget" must be 0 (no limit) or a number of seconds.')
        if not self.lr > 0 or not self.temperature > 0:
            raise ValueError('Arguments "lr" and "temperature" must be positive.')
        for name in ("style", "artefacts"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f'Argument "{name}" must be from 0 to 1.')


def pretrain_samples(samples: Sequence[Sample], held_out: set[str],
                     labels: Sequence[str] = ("covid", "normal", "other")) -> list[Sample]:
    """The classification samples of ``labels`` whose patient is not in ``held_out`` (the validation and
    test patients)."""
    return [s for s in samples if s.task == "classification" and s.label in labels
            and s.patient_id not in held_out]


def backbone(arch: str) -> tuple[nn.Module, int]:
    """A stage 2 network of ``arch`` with its class head replaced by the identity, and its feature width."""
    from inference.models.classifiers import build_classifier

    if arch not in HEADS:
        raise ValueError(f'Argument "arch" must be one of {", ".join(HEADS)}; got {arch!r}.')
    model = build_classifier(arch)
    parent_name, _, attr = HEADS[arch].rpartition(".")
    parent = model.get_submodule(parent_name)  # "" is the model itself
    width = int(parent.get_submodule(attr).in_features)  # type: ignore[arg-type]
    parent.register_module(attr, nn.Identity())  # replaces the head (in a Sequential too, by its index)
    return model, width


def projector(width: int, out: int = 128) -> nn.Module:
    """SimCLR's projection head: the loss is taken on its output, the features before it are kept."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, out))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The NT-Xent loss of two views (N, D) of N images: each view must pick its partner among the 2N - 1
    other views by cosine similarity / ``temperature``."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def views(x: torch.Tensor, config: PretrainConfig, generator: torch.Generator) -> torch.Tensor:
    """One random view of each image of ``x`` (N, 1, S, S in [0, 1]), normalised for the network."""
    out, _ = augment(x, generator=generator, max_rotate_deg=10.0, scale=(0.9, 1.6), max_shift=0.12,
                     style=config.style, artefacts=config.artefacts)
    return (out - config.mean) / config.std


def features(model: nn.Module, images: torch.Tensor, config: PretrainConfig, device: torch.device,
             batch: int = 64) -> torch.Tensor:
    """The backbone's pooled features of uint8 ``images`` (N, 1, S, S), L2-normalised, on the CPU."""
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = (images[i:i + batch].to(device).float() / 255.0 - config.mean) / config.std
            out.append(F.normalize(model(x).float(), dim=1).cpu())
    return torch.cat(out) if out else torch.zeros((0, 1))


def knn_check(train: torch.Tensor, train_y: np.ndarray, val: torch.Tensor, val_y: np.ndarray,
              val_sources: Sequence[str], k: int = 10) -> dict[str, float | None]:
    """How well the features alone tell COVID-19 from normal on ``val``: each image scores the share of
    COVID-19 among its ``k`` nearest ``train`` features. ``roc_auc`` over all images,
    ``within_source_roc_auc`` over the pairs of one source only (where the source cannot help; None without
    such pairs)."""
    from training.metrics import per_group, roc_auc, within_group_auc

    if len(set(val_y.tolist())) < 2 or len(train) < k:
        return {"roc_auc": None, "within_source_roc_auc": None}
    nearest = (val @ train.T).topk(k, dim=1).indices.numpy()
    score = train_y[nearest].mean(axis=1)
    within = within_group_auc(per_group(val_y, score, list(val_sources), 0.5))["roc_auc"]
    return {"roc_auc": float(roc_auc(val_y, score)),
            "within_source_roc_auc": None if math.isnan(within) else float(within)}


@keeps_kernel_settings
def pretrain(images: torch.Tensor, arch: str, config: PretrainConfig, device: torch.device, *,
             checkpoint: Path | None = None, resume: bool = False,
             say: Callable[[str], None] = lambda _: None) -> tuple[nn.Module, list[float]]:
    """Contrastive pretraining of ``arch``'s backbone on uint8 ``images`` (N, 1, S, S).

    Returns the backbone (class head replaced by the identity) and the mean loss per epoch. With
    ``checkpoint`` the state is saved every ``checkpoint_every`` epochs and at the end; ``resume`` continues
    from it. With ``config.time_budget`` the first epoch's duration sets how many of ``config.epochs`` are
    run (at least one), so a run with a deadline ends with its encoder saved and its schedule complete.
    """
    if images.ndim != 4 or images.shape[1] != 1 or images.dtype != torch.uint8:
        raise ValueError('Argument "images" must be a uint8 tensor of shape (N, 1, S, S).')
    if len(images) < 2:
        raise ValueError('Argument "images" must hold at least 2 images.')
    torch.manual_seed(config.seed)
    use_deterministic_kernels(config.deterministic)
    model, width = backbone(arch)
    head = projector(width)
    model.to(device)
    head.to(device)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    batch = min(config.batch_size, len(images))
    steps = max(1, len(images) // batch)
    if config.max_steps:
        steps = min(steps, config.max_steps)
    epochs = config.epochs
    total = epochs * steps

    def lr_at(step: int) -> float:  # one epoch of linear warm-up, then cosine decay to 0
        if step < steps:
            return config.lr * (step + 1) / steps
        return config.lr * 0.5 * (1 + math.cos(math.pi * (step - steps) / max(1, total - steps)))

    gen = torch.Generator(device=device).manual_seed(config.seed)
    order_gen = torch.Generator().manual_seed(config.seed)
    history: list[float] = []
    start = 0
    if resume and checkpoint is not None and checkpoint.is_file():
        ck = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(ck["model"])
        head.load_state_dict(ck["head"])
        opt.load_state_dict(ck["opt"])
        history, start = list(ck["history"]), int(ck["epoch"])
        epochs = int(ck.get("epochs", epochs))
        total = epochs * steps
        gen.set_state(ck["gen"].cpu())
        order_gen.set_state(ck["order_gen"].cpu())
        torch.set_rng_state(ck["torch_rng"].cpu())  # dropout (MobileNetV2) draws from it
        if device.type == "cuda" and "cuda_rng" in ck:
            torch.cuda.set_rng_state(ck["cuda_rng"].cpu(), device)
        say(f"resumed pretraining at epoch {start + 1}")
    autocast = device.type == "cuda"
    if autocast:  # a few hundred uint8 images: kept on the device, not copied batch by batch
        images = images.to(device)
    epoch = start
    while epoch < epochs:
        model.train()
        head.train()
        order = torch.randperm(len(images), generator=order_gen)
        t0, losses, first_step = time.monotonic(), [], 0.0
        for i in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch * steps + i)
            x = images[order[i * batch:(i + 1) * batch]].to(device).float() / 255.0
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                z = head(model(torch.cat([views(x, config, gen), views(x, config, gen)])))
            loss = nt_xent(z[:len(x)], z[len(x):], config.temperature)
            if not torch.isfinite(loss):
                raise RuntimeError(f"pretraining loss is not finite at epoch {epoch + 1}, step {i + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))  # waits for the device: the step's time is complete
            if i == 0:
                first_step = time.monotonic() - t0
        history.append(float(np.mean(losses)))
        seconds = time.monotonic() - t0
        if epoch == 0 and config.time_budget:  # still in warm-up: the cosine decay starts after this epoch
            epochs = epochs_within(config.time_budget, seconds, first_step, steps, epochs)
            total = epochs * steps
            if epochs < config.epochs:
                say(f"time budget {config.time_budget:.0f} s: {epochs} epochs of {config.epochs}")
        say(f"pretrain epoch {epoch + 1}/{epochs}: loss {history[-1]:.4f} ({seconds:.0f} s)")
        last = epoch + 1 == epochs
        if checkpoint is not None and (last or (epoch + 1) % max(1, config.checkpoint_every) == 0):
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "head": head.state_dict(), "opt": opt.state_dict(),
                        "history": history, "epoch": epoch + 1, "epochs": epochs, "gen": gen.get_state(),
                        "order_gen": order_gen.get_state(), "torch_rng": torch.get_rng_state(),
                        **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})},
                       tmp)
            tmp.replace(checkpoint)
        epoch += 1
    return model.cpu(), history


def epochs_within(budget: float, first_epoch: float, first_step: float, steps: int, cap: int) -> int:
    """How many epochs (at least 1, at most ``cap``) fit ``budget`` seconds, the first one included, from the
    first epoch's time. Its first step also paid for start-up (kernel selection, caches), so the later epochs
    are timed by its other steps."""
    steady = (first_epoch - first_step) * steps / (steps - 1) if steps > 1 else first_epoch
    return max(1, min(cap, 1 + int(max(0.0, budget - first_epoch) // max(steady, 1e-9))))


def save_encoder(model: nn.Module, path: Path) -> str:
    """Write the backbone's weights (torchvision layout, no class head) as safetensors; return their
    SHA-256."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pretrain_on_data(data: Path, split_file: Path, out: Path, *, arch: str = "resnet18", size: int = 224,
                 labels: Sequence[str] = ("covid", "normal", "other"), config: PretrainConfig | None = None,
                 device: str = "auto", resume: bool = False,
                 say: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Pretrain on ``data`` (a manifest or folder with ``manifest.csv``) leaving out ``split_file``'s
    validation and test patients; write ``encoder.safetensors`` and ``pretrain.json`` into ``out``; return
    the record."""
    from training.tensors import build_image_set

    config = config or PretrainConfig()
    bad = sorted(set(labels) - {*CLASS_LABELS, "other"})
    if bad or not labels:
        raise ValueError(f'Argument "labels" must name some of covid, normal, other; got {list(labels)}.')
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    split = load_split(split_file)
    all_samples = load_data(data)
    chosen = pretrain_samples(all_samples, set(split.val) | set(split.test), labels)
    if len(chosen) < 2:
        raise ValueError(f"{data}: fewer than 2 images outside the split's validation and test patients")
    t0 = time.monotonic()
    say(f"{len(chosen)} images for pretraining ({arch}, {size} px, {config.epochs} epochs, {dev})")
    # The features are checked on the validation side, against the labelled training images, before
    # (random weights of the same seed) and after pretraining. Each image is decoded once.
    labelled = [s for s in all_samples if s.task == "classification" and s.label in CLASS_LABELS]
    train, val = split.select(labelled, "train"), split.select(labelled, "val")
    needed = list(dict.fromkeys([*chosen, *train, *val]))
    row = {s: i for i, s in enumerate(needed)}
    decoded = build_image_set(needed, seg_size=32, cls_size=size).whole
    images = decoded[[row[s] for s in chosen]]
    check_sets = {side: decoded[[row[s] for s in samples]]
                  for side, samples in (("train", train), ("val", val)) if samples}

    def check(model: nn.Module) -> dict[str, float | None]:
        if len(check_sets) < 2:
            return {"roc_auc": None, "within_source_roc_auc": None}
        feats = {side: features(model.to(dev), x, config, dev) for side, x in check_sets.items()}
        return knn_check(feats["train"], np.array([s.target for s in train]), feats["val"],
                         np.array([s.target for s in val]), [s.source for s in val])

    torch.manual_seed(config.seed)
    before = check(backbone(arch)[0])
    model, history = pretrain(images, arch, config, dev, checkpoint=out / "checkpoints" / "pretrain.pt",
                              resume=resume, say=say)
    sha = save_encoder(model, out / "encoder.safetensors")
    after = check(model)
    record = {
        "arch": arch, "input_size": size, "method": "SimCLR (NT-Xent)", "config": asdict(config),
        "images": len(chosen),
        "images_by_source_label": dict(sorted(Counter(f"{s.source}/{s.label}" for s in chosen).items())),
        "left_out": "patients of the split's validation and test sides", "split": str(split_file),
        "epochs_run": len(history), "loss_per_epoch": [round(v, 5) for v in history],
        "val_knn": {"random_weights": before, "pretrained": after, "k": 10},
        "seconds": round(time.monotonic() - t0, 1), "encoder": "encoder.safetensors", "sha256": sha,
    }
    (out / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    say(f"encoder: {out / 'encoder.safetensors'}; validation k-NN ROC AUC / within source: random weights "
        f"{before['roc_auc']} / {before['within_source_roc_auc']}, pretrained {after['roc_auc']} / "
        f"{after['within_source_roc_auc']}")
    return record


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cxr-node pretrain``."""
    p.add_argument("--data", required=True, type=Path, help="manifest CSV or folder with manifest.csv")
    p.add_argument("--split", required=True, type=Path,
                   help="split.json of the run the encoder is for: its validation and test patients are "
                        "left out")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder (encoder.safetensors, pretrain.json)")
    p.add_argument("--arch", choices=tuple(HEADS), default="resnet18")
    p.add_argument("--size", type=int, default=224, help="input size (px) of the views")
    p.add_argument("--labels", default="covid,normal,other",
                   help="comma-separated labels of the images used (their labels are not read otherwise)")
    p.add_argument("--epochs", type=int, default=PretrainConfig.epochs)
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds the pretraining may take: the first epoch's time cuts the epochs to fit "
                        "(0: no limit)")
    p.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=PretrainConfig.lr)
    p.add_argument("--temperature", type=float, default=PretrainConfig.temperature)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/pretrain.pt")
    p.add_argument("--max-steps", type=int, default=0, help=argparse.SUPPRESS)


def run(args: argparse.Namespace, settings: Any = None) -> int:
    """Entry point of ``cxr-node pretrain``."""
    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    config = PretrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            temperature=args.temperature, seed=args.seed, max_steps=args.max_steps,
                            time_budget=args.time_budget)
    pretrain_on_data(args.data, args.split, args.out, arch=args.arch, size=args.size,
                 labels=[v.strip() for v in args.labels.split(",") if v.strip()], config=config,
                 device=args.device, resume=args.resume, say=say)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.pretrain", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
