"""Model bundles: two sets of weights (safetensors) and a ``model.json`` card that is their contract.

Layout of a bundle directory::

    model.json                  # the card (see REQUIRED_KEYS), validated on load
    segmenter.safetensors       # stage 1 state_dict (float32 or float16)
    classifier.safetensors      # stage 2 state_dict (float32, float16, or int8 with per-channel scales)

Stage 2 may be an ensemble of several networks of one architecture (``architectures.classifier_members``,
1 when absent): the mean of their logits answers, their heatmaps are averaged (``inference.explain``).

The card records the SHA-256 of both weight files, so a bundle changed in place fails to load:
new weights always mean a new bundle with a new version and a new device UID
(:func:`create_bundle` refuses a directory that is not empty). Weights are never pickled modules.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydicom.uid import generate_uid
from torch import nn

from dicom_node.errors import ModelBundleError
from inference.models.classifiers import (
    CLASSIFIERS,
    MAX_MEMBERS,
    build_stage2,
    equalize_inputs,
    is_equalizing,
)
from inference.models.segmentation import SEGMENTERS, SIZE_MULTIPLE, build_segmenter

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CARD_FILE = "model.json"
WEIGHT_FILES = {"segmenter": "segmenter.safetensors", "classifier": "classifier.safetensors"}
TARGETS = ["normal", "covid19"]
CROP_MODES = ("lung", "whole", "square")  # stage 2 input: lung crop, whole image padded, its centre square
# Keys every card must hold, with their JSON types.
REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "name": str,
    "version": str,
    "device_uid": str,
    "created": str,
    "architectures": dict,
    "input_sizes": dict,
    "normalisation": dict,
    "targets": list,
    "threshold": (int, float),
    "crop_mode": str,
    "training_data": dict,
    "metrics": dict,
    "files": dict,
}
# Keys the caller of create_bundle supplies (the rest are filled in).
CALLER_KEYS = (
    "name",
    "version",
    "architectures",
    "input_sizes",
    "normalisation",
    "targets",
    "threshold",
    "crop_mode",
    "training_data",
    "metrics",
)
# In an int8 weights file every quantised tensor ``k`` has its float32 scales (one per output channel) in
# ``k + INT8_SCALE``: value = int8 * scale.
INT8_SCALE = "::int8_scale"
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")  # DICOM UI value
_VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")


def default_bundle_path() -> Path:
    """The bundle shipped inside the package (``inference/default_model/``)."""
    return Path(__file__).resolve().parent / "default_model"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: Registry metrics key holding the SHA-256 of a bundle's model.json when it was registered: the card names
#: the weights' hashes, so this one digest stands for the whole bundle.
CARD_DIGEST_KEY = "model_json_sha256"


def card_digest(bundle_path: str | Path) -> str:
    """SHA-256 of the bundle's ``model.json`` (its card lists the weight files' own hashes)."""
    return _sha256(Path(bundle_path) / CARD_FILE)


def card_changed(bundle_path: str | Path, registry_metrics: dict[str, Any] | None) -> bool:
    """Whether the bundle's ``model.json`` differs from the one a registry row recorded (its metrics'
    ``CARD_DIGEST_KEY``); False for a row registered before the digest was recorded."""
    digest = (registry_metrics or {}).get(CARD_DIGEST_KEY)
    return bool(digest) and card_digest(bundle_path) != digest


def _fail(path: Path, problem: str) -> ModelBundleError:
    return ModelBundleError(f"model bundle {path}: {problem}")


def validate_card(card: Any, path: Path) -> dict[str, Any]:
    """Check a parsed ``model.json``; raise :class:`ModelBundleError` naming the first problem."""
    if not isinstance(card, dict):
        raise _fail(path, f"{CARD_FILE} must hold a JSON object")
    for key, kind in REQUIRED_KEYS.items():
        if key not in card:
            raise _fail(path, f"{CARD_FILE} is missing key '{key}'")
        if not isinstance(card[key], kind) or isinstance(card[key], bool):
            raise _fail(path, f"{CARD_FILE} key '{key}' has the wrong type ({type(card[key]).__name__})")
    if card["format_version"] != FORMAT_VERSION:
        raise _fail(
            path, f"unsupported format_version {card['format_version']} (this node reads {FORMAT_VERSION})"
        )
    if not _VERSION_RE.match(card["version"]):
        raise _fail(path, f"key 'version' is not a valid version string: {card['version']!r}")
    if len(card["device_uid"]) > 64 or not _UID_RE.match(card["device_uid"]):
        raise _fail(path, f"key 'device_uid' is not a valid DICOM UID: {card['device_uid']!r}")
    arch, sizes = card["architectures"], card["input_sizes"]
    for stage, known in (("segmenter", SEGMENTERS), ("classifier", CLASSIFIERS)):
        if arch.get(stage) not in known:
            raise _fail(path, f"unknown {stage} architecture {arch.get(stage)!r} (known: {', '.join(known)})")
        size = sizes.get(stage)
        if not isinstance(size, int) or isinstance(size, bool) or not 32 <= size <= 1024:
            raise _fail(path, f"key 'input_sizes.{stage}' must be an integer from 32 to 1024; got {size!r}")
    members = arch.get("classifier_members", 1)
    if not isinstance(members, int) or isinstance(members, bool) or not 1 <= members <= MAX_MEMBERS:
        raise _fail(path, "key 'architectures.classifier_members' must be an integer from 1 to "
                    f"{MAX_MEMBERS}; got {members!r}")
    if sizes["segmenter"] % SIZE_MULTIPLE:
        raise _fail(path, f"key 'input_sizes.segmenter' must be a multiple of {SIZE_MULTIPLE}")
    norm = card["normalisation"]
    for key in ("mean", "std"):
        if not isinstance(norm.get(key), int | float) or isinstance(norm.get(key), bool):
            raise _fail(path, f"key 'normalisation.{key}' must be a number")
    if norm["std"] <= 0:
        raise _fail(path, "key 'normalisation.std' must be positive")
    if not isinstance(norm.get("equalize", False), bool):
        raise _fail(path, "key 'normalisation.equalize' must be true or false")
    if card["targets"] != TARGETS:
        raise _fail(path, f"key 'targets' must be {TARGETS}; got {card['targets']!r}")
    if not 0.0 < float(card["threshold"]) < 1.0:
        raise _fail(path, f"key 'threshold' must be between 0 and 1; got {card['threshold']!r}")
    if card["crop_mode"] not in CROP_MODES:
        raise _fail(
            path, f"key 'crop_mode' must be one of {', '.join(CROP_MODES)}; got {card['crop_mode']!r}"
        )
    for stage, name in WEIGHT_FILES.items():
        if not isinstance(card["files"].get(name), str):
            raise _fail(path, f"key 'files' has no SHA-256 for the {stage} weights '{name}'")
    return card


def _load_weights(path: Path, stage: str, model: nn.Module, expected_sha: str) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = path / WEIGHT_FILES[stage]
    if not file.is_file():
        raise _fail(path, f"missing weights file {WEIGHT_FILES[stage]}")
    if _sha256(file) != expected_sha:
        raise _fail(
            path, f"{WEIGHT_FILES[stage]} does not match the SHA-256 in {CARD_FILE} (changed in place?)"
        )
    try:
        state = load_file(str(file), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise _fail(path, f"{WEIGHT_FILES[stage]} cannot be read as safetensors: {exc}") from exc
    state = _dequantize(state, path, WEIGHT_FILES[stage])
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing:
        raise _fail(path, f"{WEIGHT_FILES[stage]} is missing key(s) {', '.join(missing[:5])}")
    if unexpected:
        raise _fail(path, f"{WEIGHT_FILES[stage]} has unexpected key(s) {', '.join(unexpected[:5])}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise _fail(
                path,
                f"{WEIGHT_FILES[stage]}: shape mismatch for '{key}': "
                f"{tuple(tensor.shape)} in the file, {tuple(own[key].shape)} expected",
            )
        if not torch.isfinite(tensor.float()).all():
            raise _fail(path, f"{WEIGHT_FILES[stage]}: '{key}' holds NaN or infinite values")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def _dequantize(state: dict[str, torch.Tensor], path: Path, name: str) -> dict[str, torch.Tensor]:
    """Replace every int8 tensor and its ``INT8_SCALE`` partner by the float32 tensor they encode."""
    scales = {k[: -len(INT8_SCALE)]: v for k, v in state.items() if k.endswith(INT8_SCALE)}
    out = {k: v for k, v in state.items() if not k.endswith(INT8_SCALE)}
    for key, tensor in out.items():
        if tensor.dtype == torch.int8 and key not in scales:
            raise _fail(path, f"{name}: int8 tensor '{key}' has no scales '{key}{INT8_SCALE}'")
    for key, scale in scales.items():
        q = out.get(key)
        if q is None or q.dtype != torch.int8 or q.ndim < 1 or tuple(scale.shape) != (q.shape[0],):
            raise _fail(path, f"{name}: scales '{key}{INT8_SCALE}' do not fit an int8 tensor '{key}'")
        out[key] = q.float() * scale.float().view(-1, *([1] * (q.ndim - 1)))
    return out


def quantize_int8(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one float32 scale per output channel (dim 0): (values, scales)."""
    w = tensor.detach().float().reshape(tensor.shape[0], -1)
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(tensor.shape).contiguous(), scale.contiguous()


@dataclass
class ModelBundle:
    """A loaded, validated bundle: its card and both networks (float32, CPU, eval mode)."""

    path: Path
    card: dict[str, Any]
    segmenter: nn.Module
    classifier: nn.Module

    @classmethod
    def load(cls, path: str | Path | None = None) -> ModelBundle:
        """Load and validate the bundle at ``path`` (None: the shipped default bundle).

        Raises
        ------
        ModelBundleError
            The directory, card or a weights file is missing or unreadable, a key is missing or
            invalid, an architecture is unknown, or a weight is missing or has the wrong shape.
        """
        if path is None:
            path = default_bundle_path()
            if not (path / CARD_FILE).is_file():
                raise ModelBundleError(
                    f"no default model is installed ({path} holds no {CARD_FILE}); give a bundle with --model"
                )
        path = Path(path)
        if not path.is_dir():
            raise _fail(path, "not a directory")
        card_file = path / CARD_FILE
        if not card_file.is_file():
            raise _fail(path, f"missing {CARD_FILE}")
        try:
            card = json.loads(card_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _fail(path, f"{CARD_FILE} is not valid JSON: {exc}") from exc
        validate_card(card, path)
        segmenter = build_segmenter(card["architectures"]["segmenter"])
        classifier = build_stage2(
            card["architectures"]["classifier"],
            card["architectures"].get("classifier_members", 1),
            num_classes=len(TARGETS),
        )
        _load_weights(path, "segmenter", segmenter, card["files"][WEIGHT_FILES["segmenter"]])
        _load_weights(path, "classifier", classifier, card["files"][WEIGHT_FILES["classifier"]])
        if card["normalisation"].get("equalize", False):
            norm = card["normalisation"]
            equalize_inputs(classifier, norm["mean"], norm["std"])
        log.info(
            "model bundle loaded",
            extra={"action": "bundle_loaded", "bundle_version": card["version"], "path": str(path)},
        )
        return cls(path, card, segmenter.eval(), classifier.eval())

    name = property(lambda self: str(self.card["name"]), doc="Algorithm name.")
    version = property(lambda self: str(self.card["version"]), doc="Bundle version.")
    device_uid = property(lambda self: str(self.card["device_uid"]), doc="DICOM Device UID of this bundle.")
    threshold = property(lambda self: float(self.card["threshold"]), doc="Operating threshold on P(covid19).")
    crop_mode = property(lambda self: str(self.card["crop_mode"]), doc="'lung', 'whole' or 'square'.")
    targets = property(lambda self: list(self.card["targets"]), doc="Class names in logit order.")
    segmenter_arch = property(lambda self: str(self.card["architectures"]["segmenter"]))
    classifier_arch = property(lambda self: str(self.card["architectures"]["classifier"]))
    classifier_members = property(
        lambda self: int(self.card["architectures"].get("classifier_members", 1)),
        doc="Networks in stage 2 (more than 1: an ensemble averaging their logits).",
    )
    segmenter_size = property(lambda self: int(self.card["input_sizes"]["segmenter"]))
    classifier_size = property(lambda self: int(self.card["input_sizes"]["classifier"]))
    mean = property(lambda self: float(self.card["normalisation"]["mean"]))
    std = property(lambda self: float(self.card["normalisation"]["std"]))
    equalize = property(
        lambda self: bool(self.card["normalisation"].get("equalize", False)),
        doc="Whether stage 2 histogram-equalises its input (inference.models.classifiers.equalize).",
    )


def _save_weights(model: nn.Module, file: Path, half: bool, arch: str, int8: bool = False) -> str:
    from safetensors.torch import save_file

    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu").contiguous()
        if int8 and v.is_floating_point() and v.ndim >= 2:
            state[k], state[k + INT8_SCALE] = quantize_int8(v)
        else:
            state[k] = v.half() if (half or int8) and v.is_floating_point() else v
    meta = {"format": "pt", "architecture": arch}
    if int8:
        meta["quantization"] = "int8 per output channel (convolution and linear weights), float16 otherwise"
    save_file(state, str(file), metadata=meta)
    return _sha256(file)


def create_bundle(
    out_dir: str | Path,
    *,
    segmenter: nn.Module,
    classifier: nn.Module,
    card: dict[str, Any],
    half: bool = False,
    int8_classifier: bool = False,
) -> Path:
    """Write a new bundle and return its path (after loading it back as a check).

    ``card`` supplies the keys in ``CALLER_KEYS``; ``format_version``, ``created``, ``files`` and a
    fresh ``device_uid`` are always assigned here (a value given for them is replaced), so every
    bundle gets its own device UID. ``half`` stores floating weights as float16 (loaded as float32);
    ``int8_classifier`` stores stage 2's convolution and linear weights as int8 with one scale per output
    channel (a quarter of float32; what lets an ensemble of larger networks fit a small bundle).
    ``out_dir`` must not exist or be empty: a bundle never changes in place.
    """
    out = Path(out_dir)
    if not isinstance(card, dict):
        raise TypeError('Argument "card" must be a dict.')
    missing = [k for k in CALLER_KEYS if k not in card]
    if missing:
        raise ValueError(f'Argument "card" is missing key(s): {", ".join(missing)}.')
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f'Argument "out_dir": {out} exists and is not empty; a bundle never changes in place.'
        )
    full = {
        **card,
        "format_version": FORMAT_VERSION,
        "device_uid": str(generate_uid()),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    full["files"] = {}
    validate_card({**full, "files": dict.fromkeys(WEIGHT_FILES.values(), "")}, out)
    equalizing = is_equalizing(classifier)
    if equalizing != bool(card["normalisation"].get("equalize", False)):
        raise ValueError(
            'Argument "card": normalisation.equalize must be true exactly when the classifier equalises its '
            f"input (it does{'' if equalizing else ' not'})."
        )
    out.mkdir(parents=True, exist_ok=True)
    full["files"][WEIGHT_FILES["segmenter"]] = _save_weights(
        segmenter, out / WEIGHT_FILES["segmenter"], half, full["architectures"]["segmenter"]
    )
    full["files"][WEIGHT_FILES["classifier"]] = _save_weights(
        classifier,
        out / WEIGHT_FILES["classifier"],
        half,
        full["architectures"]["classifier"],
        int8=int8_classifier,
    )
    tmp = out / (CARD_FILE + ".tmp")
    tmp.write_text(json.dumps(full, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, out / CARD_FILE)
    ModelBundle.load(out)
    log.info(
        "model bundle written",
        extra={"action": "bundle_created", "bundle_version": full["version"], "path": str(out)},
    )
    return out


def random_card(
    seg_arch: str, cls_arch: str, seg_size: int, cls_size: int, version: str, crop_mode: str = "lung"
) -> dict[str, Any]:
    """A card for an untrained bundle (tests, benchmarks): threshold 0.5, no metrics."""
    return {
        "name": "cxr-node-random",
        "version": version,
        "architectures": {"segmenter": seg_arch, "classifier": cls_arch},
        "input_sizes": {"segmenter": seg_size, "classifier": cls_size},
        "normalisation": {"mean": 0.5, "std": 0.25},
        "targets": list(TARGETS),
        "threshold": 0.5,
        "crop_mode": crop_mode,
        "training_data": {"description": "none: random weights, for tests and benchmarks only"},
        "metrics": {},
    }


def make_random_bundle(
    out_dir: str | Path,
    seg_arch: str = "unet",
    cls_arch: str = "mobilenet_v2",
    seg_size: int = 128,
    cls_size: int = 128,
    version: str = "0.0.0-test",
    *,
    crop_mode: str = "lung",
    fit_segmenter_steps: int = 0,
    seed: int = 0,
    fit_device: str = "cpu",
    members: int = 1,
    int8_classifier: bool = False,
    equalize: bool = False,
) -> Path:
    """A bundle with random weights, for tests and benchmarks (never for patients).

    With ``fit_segmenter_steps`` > 0 stage 1 is first fitted for that many Adam steps to synthetic
    phantoms (``inference.phantom``), so that the pipeline finds two lungs on phantoms and runs
    stage 2 and Grad-CAM as it would with a trained model. ``members`` > 1 makes stage 2 an ensemble;
    ``int8_classifier`` stores it as int8 (see :func:`create_bundle`); ``equalize`` makes stage 2
    histogram-equalise its input (``normalisation.equalize``).
    """
    torch.manual_seed(seed)
    segmenter = build_segmenter(seg_arch)
    classifier = build_stage2(cls_arch, members)
    if fit_segmenter_steps > 0:
        fit_segmenter_to_phantoms(segmenter, seg_size, fit_segmenter_steps, seed=seed, device=fit_device)
    card = random_card(seg_arch, cls_arch, seg_size, cls_size, version, crop_mode)
    if members > 1:
        card["architectures"]["classifier_members"] = members
    if equalize:
        card["normalisation"]["equalize"] = True
        equalize_inputs(classifier, card["normalisation"]["mean"], card["normalisation"]["std"])
    if fit_segmenter_steps > 0:
        card["training_data"] = {
            "description": f"stage 1 fitted for {fit_segmenter_steps} steps to "
            "synthetic phantoms; stage 2 random"
        }
    return create_bundle(
        out_dir, segmenter=segmenter, classifier=classifier, card=card, int8_classifier=int8_classifier
    )


def fit_segmenter_to_phantoms(
    model: nn.Module,
    size: int,
    steps: int,
    *,
    seed: int = 0,
    batch: int = 4,
    lr: float = 3e-3,
    device: str = "cpu",
) -> float:
    """Fit a stage 1 network to synthetic phantoms for ``steps`` Adam steps; returns the last loss.

    Uses the same preprocessing as inference (``square_resize`` and mean 0.5 / std 0.25), with
    phantoms of varied shape so that padding is seen as well. The model is fitted on ``device``
    and returned to the CPU.
    """
    import numpy as np

    from inference.imaging import square_resize
    from inference.models.segmentation import segmentation_loss
    from inference.phantom import make_phantom

    rng = np.random.default_rng(seed)
    images, masks = [], []
    for i in range(16):
        rows = int(rng.integers(size, 2 * size))
        cols = int(rng.integers(size, 2 * size))
        img, mask = make_phantom((rows, cols), opacity=float(rng.uniform(0, 0.5)), seed=seed + i)
        images.append(square_resize(img, size))
        masks.append(square_resize(mask.astype(np.float32), size) > 0.5)
    x = (torch.from_numpy(np.stack(images))[:, None].float() - 0.5) / 0.25
    y = torch.from_numpy(np.stack(masks))[:, None].float()
    model.to(device)
    x, y = x.to(device), y.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    loss = torch.zeros(())
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        opt.zero_grad()
        loss = segmentation_loss(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
    model.eval().to("cpu")
    return float(loss.detach())
