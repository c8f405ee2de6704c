"""Model bundles: round trip, a new device UID each time, and every loader error."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from pydicom.uid import UID
from safetensors.torch import save_file

from dicom_node.errors import ModelBundleError
from inference.bundle import (
    CARD_FILE,
    INT8_SCALE,
    ModelBundle,
    _sha256,
    create_bundle,
    default_bundle_path,
    quantize_int8,
    random_card,
)
from inference.models.classifiers import (
    ClassifierEnsemble,
    build_classifier,
    build_stage2,
    equalize,
    equalize_inputs,
    is_equalizing,
)
from inference.models.segmentation import build_segmenter

pytestmark = pytest.mark.unit


def test_round_trip_keeps_card_and_weights(tmp_path: Path) -> None:
    seg, cls = build_segmenter("unet"), build_classifier("mobilenet_v2")
    card = random_card("unet", "mobilenet_v2", 64, 64, "1.2.3")
    card["metrics"] = {"roc_auc": 0.9}
    path = create_bundle(tmp_path / "b", segmenter=seg, classifier=cls, card=card)
    bundle = ModelBundle.load(path)
    assert bundle.version == "1.2.3" and bundle.name == card["name"]
    assert bundle.threshold == 0.5 and bundle.targets == ["normal", "covid19"]
    assert bundle.segmenter_size == 64 and bundle.classifier_arch == "mobilenet_v2"
    assert bundle.card["metrics"] == {"roc_auc": 0.9}
    assert UID(bundle.device_uid).is_valid
    assert bundle.card["format_version"] == 1 and bundle.card["created"]
    for ours, theirs in ((seg, bundle.segmenter), (cls, bundle.classifier)):
        for key, value in ours.state_dict().items():
            assert torch.equal(value, theirs.state_dict()[key]), key
    assert not bundle.segmenter.training and not bundle.classifier.training


def test_half_precision_weights_load_as_float32(tmp_path: Path) -> None:
    seg, cls = build_segmenter("unet"), build_classifier("resnet18")
    path = create_bundle(tmp_path / "h", segmenter=seg, classifier=cls,
                         card=random_card("unet", "resnet18", 64, 64, "1.0.0"), half=True)
    bundle = ModelBundle.load(path)
    w = bundle.classifier.fc.weight
    assert w.dtype == torch.float32
    assert torch.allclose(w, cls.fc.weight, atol=1e-3)
    n_floats = sum(p.numel() for p in cls.parameters())
    assert (path / "classifier.safetensors").stat().st_size < 0.6 * 4 * n_floats


def test_int8_ensemble_round_trip_answers_like_the_float_networks(tmp_path: Path) -> None:
    torch.manual_seed(1)
    seg, cls = build_segmenter("unet"), build_stage2("resnet18", 3).eval()
    card = random_card("unet", "resnet18", 64, 64, "2.0.0")
    card["architectures"]["classifier_members"] = 3
    path = create_bundle(tmp_path / "e", segmenter=seg, classifier=cls, card=card, int8_classifier=True)
    bundle = ModelBundle.load(path)
    assert bundle.classifier_members == 3 and isinstance(bundle.classifier, ClassifierEnsemble)
    x = torch.randn(4, 1, 64, 64)
    with torch.inference_mode():
        p_float = torch.softmax(cls(x), 1)
        p_loaded = torch.softmax(bundle.classifier(x), 1)
        single = [torch.softmax(m(x), 1) for m in cls.members]
    assert (p_loaded - p_float).abs().max() < 0.02
    # the members answer differently, so agreeing with their mean is not agreeing with any one of them
    assert max(float((s - p_float).abs().max()) for s in single) > 0.02
    n_weights = sum(p.numel() for p in cls.parameters())
    assert (path / "classifier.safetensors").stat().st_size < 1.2 * n_weights  # about one byte per weight


def test_int8_quantisation_error_is_bounded_per_channel() -> None:
    w = torch.randn(8, 3, 3, 3) * torch.logspace(-3, 1, 8).view(8, 1, 1, 1)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (8,)
    back = q.float() * scale.view(8, 1, 1, 1)
    # every channel keeps its own range: the error is at most half a step of that channel
    assert ((back - w).abs().amax(dim=(1, 2, 3)) <= scale / 2 + 1e-9).all()
    assert q.abs().max() == 127


def test_every_bundle_gets_a_new_device_uid(tmp_path: Path, tiny_bundle: Path) -> None:
    card = random_card("unet", "mobilenet_v2", 64, 64, "0.0.1")
    card["device_uid"] = ModelBundle.load(tiny_bundle).device_uid
    path = create_bundle(tmp_path / "n", segmenter=build_segmenter("unet"),
                         classifier=build_classifier("mobilenet_v2"), card=card)
    assert ModelBundle.load(path).device_uid != card["device_uid"]


def test_create_refuses_non_empty_dir_and_bad_cards(tmp_path: Path, tiny_bundle: Path) -> None:
    seg, cls = build_segmenter("unet"), build_classifier("mobilenet_v2")
    card = random_card("unet", "mobilenet_v2", 64, 64, "9.9.9")
    with pytest.raises(ValueError, match="never changes in place"):
        create_bundle(tiny_bundle, segmenter=seg, classifier=cls, card=card)
    with pytest.raises(ValueError, match="missing key"):
        create_bundle(tmp_path / "x", segmenter=seg, classifier=cls, card={"name": "x"})
    with pytest.raises(ModelBundleError, match="unknown classifier architecture"):
        create_bundle(tmp_path / "y", segmenter=seg, classifier=cls, card={**card, "architectures": {
            "segmenter": "unet", "classifier": "alexnet"}})
    assert not (tmp_path / "y").exists()


def test_an_equalising_classifier_round_trips_and_the_card_must_say_so(tmp_path: Path) -> None:
    """normalisation.equalize in the card puts the equalisation back on load (each member of an ensemble);
    a card that does not match the classifier is refused before anything is written."""
    torch.manual_seed(0)
    seg, cls = build_segmenter("unet"), build_stage2("resnet18", 2).eval()
    equalize_inputs(cls, 0.5, 0.25)
    card = random_card("unet", "resnet18", 64, 64, "1.0.0")
    with pytest.raises(ValueError, match="normalisation.equalize"):
        create_bundle(tmp_path / "refused", segmenter=seg, classifier=cls, card=card)
    assert not (tmp_path / "refused").exists()
    card["normalisation"]["equalize"] = True
    card["architectures"]["classifier_members"] = 2
    bundle = ModelBundle.load(create_bundle(tmp_path / "b", segmenter=seg, classifier=cls, card=card))
    assert bundle.equalize and is_equalizing(bundle.classifier)
    x = torch.randn(2, 1, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(bundle.classifier(x), cls(x), atol=1e-5)
        plain = build_stage2("resnet18", 2).eval()
        plain.load_state_dict(cls.state_dict())  # the same weights without the equalisation answer otherwise
        assert not torch.allclose(plain(x), cls(x), atol=1e-3)
        assert torch.allclose(plain(equalize(x, 0.5, 0.25)), cls(x), atol=1e-5)
    with pytest.raises(ValueError, match="normalisation.equalize"):  # nor one claiming it for a plain net
        create_bundle(tmp_path / "c", segmenter=seg, classifier=plain, card=card)
    assert not (tmp_path / "c").exists()


def test_default_bundle_path_is_in_the_package() -> None:
    path = default_bundle_path()
    assert path.name == "default_model" and path.parent.name == "inference"
    assert (path / CARD_FILE).is_file(), "the repository ships a default model"
    assert ModelBundle.load(None).path == path


# -- loader errors: each mutation of a good bundle and the words the message must contain --------


def _edit_card(**changes: object) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        card = json.loads((path / CARD_FILE).read_text())
        for key, value in changes.items():
            if value is _DELETE:
                del card[key]
            else:
                card[key] = value
        (path / CARD_FILE).write_text(json.dumps(card))
    return edit


_DELETE = object()


def _append_byte(file: Path) -> None:
    with file.open("ab") as f:
        f.write(b"\0")


def _replace_weights(stage: str, state: dict[str, torch.Tensor] | None, raw: bytes | None = None) -> Callable[
        [Path], None]:
    """Write new weights for ``stage`` and update the card's SHA-256, so only the content is wrong."""
    def edit(path: Path) -> None:
        file = path / f"{stage}.safetensors"
        if raw is not None:
            file.write_bytes(raw)
        else:
            save_file(state, str(file))
        card = json.loads((path / CARD_FILE).read_text())
        card["files"][file.name] = _sha256(file)
        (path / CARD_FILE).write_text(json.dumps(card))
    return edit


def _state(arch: str) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in build_classifier(arch).state_dict().items()}


def _wrong_shape() -> dict[str, torch.Tensor]:
    state = _state("mobilenet_v2")
    state["classifier.1.weight"] = torch.zeros(3, 1280)
    return state


def _nan() -> dict[str, torch.Tensor]:
    state = _state("mobilenet_v2")
    state["classifier.1.bias"] = torch.full((2,), float("nan"))
    return state


def _missing_key() -> dict[str, torch.Tensor]:
    state = _state("mobilenet_v2")
    del state["classifier.1.bias"]
    return state


def _extra_key() -> dict[str, torch.Tensor]:
    return {**_state("mobilenet_v2"), "extra.weight": torch.zeros(1)}


def _int8_without_scale() -> dict[str, torch.Tensor]:
    state = _state("mobilenet_v2")
    state["classifier.1.weight"] = quantize_int8(state["classifier.1.weight"])[0]
    return state


def _int8_wrong_scale() -> dict[str, torch.Tensor]:
    state = _state("mobilenet_v2")
    state["classifier.1.weight"] = quantize_int8(state["classifier.1.weight"])[0]
    state["classifier.1.weight" + INT8_SCALE] = torch.ones(3)
    return state


LOADER_ERRORS: list[tuple[str, Callable[[Path], None], str]] = [
    ("no card", lambda p: (p / CARD_FILE).unlink(), "missing model.json"),
    ("bad json", lambda p: (p / CARD_FILE).write_text("{not json"), "not valid JSON"),
    ("json list", lambda p: (p / CARD_FILE).write_text("[]"), "JSON object"),
    ("missing key", _edit_card(threshold=_DELETE), "missing key 'threshold'"),
    ("missing version", _edit_card(version=_DELETE), "missing key 'version'"),
    ("wrong type", _edit_card(metrics=[]), "'metrics' has the wrong type"),
    ("format", _edit_card(format_version=99), "unsupported format_version 99"),
    ("bad version", _edit_card(version="../../x"), "not a valid version"),
    ("bad uid", _edit_card(device_uid="1.2.abc"), "not a valid DICOM UID"),
    ("unknown segmenter", _edit_card(architectures={"segmenter": "fcn", "classifier": "mobilenet_v2"}),
     "unknown segmenter architecture 'fcn'"),
    ("unknown classifier", _edit_card(architectures={"segmenter": "unet", "classifier": "vgg"}),
     "unknown classifier architecture 'vgg'"),
    ("bad size", _edit_card(input_sizes={"segmenter": 64, "classifier": 8}), "input_sizes.classifier"),
    ("size multiple", _edit_card(input_sizes={"segmenter": 72, "classifier": 64}), "multiple of 16"),
    ("bad std", _edit_card(normalisation={"mean": 0.5, "std": 0}), "'normalisation.std' must be positive"),
    ("no mean", _edit_card(normalisation={"std": 0.2}), "normalisation.mean"),
    ("equalize", _edit_card(normalisation={"mean": 0.5, "std": 0.25, "equalize": "yes"}),
     "'normalisation.equalize' must be true or false"),
    ("targets", _edit_card(targets=["covid19", "normal"]), "key 'targets'"),
    ("threshold", _edit_card(threshold=1.5), "'threshold' must be between 0 and 1"),
    ("crop", _edit_card(crop_mode="bbox"), "'crop_mode'"),
    ("files", _edit_card(files={}), "no SHA-256 for the segmenter"),
    ("no weights", lambda p: (p / "segmenter.safetensors").unlink(), "missing weights file segmenter"),
    ("changed in place", lambda p: _append_byte(p / "classifier.safetensors"),
     "does not match the SHA-256"),
    ("corrupt weights", _replace_weights("classifier", None, b"garbage" * 10),
     "cannot be read as safetensors"),
    ("other architecture", _replace_weights("classifier", _state("resnet18")), "missing key(s)"),
    ("shape mismatch", _replace_weights("classifier", _wrong_shape()),
     "shape mismatch for 'classifier.1.weight'"),
    ("missing weight", _replace_weights("classifier", _missing_key()), "missing key(s) classifier.1.bias"),
    ("unexpected weight", _replace_weights("classifier", _extra_key()), "unexpected key(s) extra.weight"),
    ("nan", _replace_weights("classifier", _nan()), "NaN"),
    ("int8 without scales", _replace_weights("classifier", _int8_without_scale()),
     "int8 tensor 'classifier.1.weight' has no scales"),
    ("int8 wrong scales", _replace_weights("classifier", _int8_wrong_scale()), "do not fit an int8 tensor"),
    ("members", _edit_card(architectures={"segmenter": "unet", "classifier": "mobilenet_v2",
                                          "classifier_members": 0}), "classifier_members"),
    ("members of one", _edit_card(architectures={"segmenter": "unet", "classifier": "mobilenet_v2",
                                                 "classifier_members": 2}), "missing key(s) members.0"),
]


@pytest.mark.parametrize(("label", "mutate", "words"), LOADER_ERRORS, ids=[e[0] for e in LOADER_ERRORS])
def test_loader_errors_name_the_problem(tmp_path: Path, tiny_bundle: Path, label: str,
                                        mutate: Callable[[Path], None], words: str) -> None:
    path = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, path)
    ModelBundle.load(path)  # the copy is good before the mutation
    mutate(path)
    with pytest.raises(ModelBundleError) as info:
        ModelBundle.load(path)
    assert words in str(info.value)
    assert str(path) in str(info.value)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelBundleError, match="not a directory"):
        ModelBundle.load(tmp_path / "nothing")
