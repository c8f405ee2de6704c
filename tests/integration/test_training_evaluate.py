"""cxr-node evaluate and cxr-node models through the real command line."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicom_node.cli import main

pytestmark = pytest.mark.integration


def test_evaluate_writes_the_report_folder(tmp_path: Path, phantom_bundle: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from training.synthetic import make_phantom_dataset

    torch.set_num_threads(1)
    make_phantom_dataset(tmp_path / "data", patients=20, images_per_patient=1, size=320)
    out = tmp_path / "report"
    rc = main(["evaluate", "--model", str(phantom_bundle), "--data", str(tmp_path / "data"),
               "--out", str(out), "--device", "cpu", "--bootstrap", "20", "--montage", "4"])
    assert rc == 0
    assert "report:" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    from inference.bundle import ModelBundle

    assert m["threshold"] == pytest.approx(ModelBundle.load(phantom_bundle).threshold)  # never tuned on test
    assert m["test"]["n"] + sum(m["not_assessable"].values()) == 2  # 2 test patients x 1 image
    assert set(m["lung_attention"]) == {"all", "positives", "negatives"}
    assert m["stage1"]["n"] + m["stage1"].get("no_mask", 0) == 2
    for name in ("roc.png", "pr.png", "confusion.png", "calibration.png", "report.md"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "## Per source" in report and "shape-normalised" in report
    pairs = sum(g["positives"] * (g["n"] - g["positives"]) for g in m["per_source"].values())
    assert m["within_source"]["pairs"] == pairs and "Within-source ROC AUC" in report
    cf = m["test_counterfactual"]  # the assessable test images again, with each mark
    assert cf["n"] == m["test"]["n"] and cf["threshold"] == m["threshold"] and len(cf["probes"]) == 5
    assert "### Counterfactual check" in report and "| histogram equalisation |" in report


def test_models_command_register_promote_rollback(tmp_path: Path, sqlite_url: str, phantom_bundle: Path,
                                                  tmp_path_factory: pytest.TempPathFactory,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from inference.bundle import ModelBundle, make_random_bundle

    other = make_random_bundle(tmp_path_factory.mktemp("b") / "second", seg_size=64, cls_size=64,
                               version="0.0.2-test")
    node = ["--db-url", sqlite_url, "--data-dir", str(tmp_path)]
    assert main(["models", *node, "--register", str(phantom_bundle)]) == 0
    assert main(["models", *node, "--register", str(other)]) == 0
    first, second = ModelBundle.load(phantom_bundle).version, "0.0.2-test"
    assert main(["models", *node, "--promote", first]) == 0
    assert main(["models", *node, "--rollback"]) == 1  # nothing earlier to go back to
    assert "no earlier promoted version" in capsys.readouterr().err
    assert main(["models", *node, "--promote", second]) == 0
    capsys.readouterr()
    assert main(["models", *node, "--json"]) == 0
    status = {v["version"]: v["status"] for v in json.loads(capsys.readouterr().out)["versions"]}
    assert status == {first: "retired", second: "current"}
    assert main(["models", *node, "--rollback"]) == 0
    capsys.readouterr()
    assert main(["models", *node, "--json"]) == 0
    status = {v["version"]: v["status"] for v in json.loads(capsys.readouterr().out)["versions"]}
    assert status == {first: "current", second: "rejected"}
    assert main(["models", *node, "--promote", "9.9.9"]) == 1


# ------------------------------------------------------------------ shortcut checks, stage 1, threshold


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one thread during the test; the previous setting afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_manifest(root: Path, rows: list[dict[str, str]]) -> Path:
    from training.synthetic import write_manifest

    return write_manifest(root, rows)


def _read_rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _shape_coded_dataset(root: Path, patients: int) -> Path:
    """Phantoms whose label is told by the shape alone: covid images wide, normal ones tall, areas alike.

    Patient ``i`` is covid when ``i`` is odd; opacities are drawn on none, so the lungs tell nothing.
    """
    from PIL import Image

    from inference.phantom import make_phantom

    (root / "images").mkdir(parents=True)
    rows = []
    for p in range(patients):
        label = "covid" if p % 2 else "normal"
        long_side = 300 + 7 * p  # odd and even margins around the centre square
        shape = (260, long_side) if label == "covid" else (long_side, 260)
        img, _ = make_phantom(shape, seed=p)
        Image.fromarray(np.rint(img * 255).astype(np.uint8)).save(root / "images" / f"p{p:03d}.png")
        rows.append({"file": f"images/p{p:03d}.png", "label": label, "task": "classification",
                     "source": "synth", "patient_id": f"synth:{p}", "view": "PA", "license": "synthetic",
                     "origin": "inference.phantom", "mask_file": ""})
    return _write_manifest(root, rows)


def _split(train: Iterable[int], val: Iterable[int], test: Iterable[int]) -> Any:
    from training.datasets import Split

    return Split(train=[f"synth:{p}" for p in train], val=[f"synth:{p}" for p in val],
                 test=[f"synth:{p}" for p in test])


def test_shape_normalised_copies_are_the_centre_squares(tmp_path: Path, phantom_bundle: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        one_thread: None) -> None:
    """On data whose label is its shape, a score of the shape alone is perfect as is and blind on the copies.

    The real pipeline runs; only the probability of each assessable result is replaced by
    columns / (rows + columns) of the image it was given, because no stage 2 scores by shape exactly.
    """
    from inference.imaging import load_any
    from inference.pipeline import Pipeline
    from training.datasets import read_manifest
    from training.evaluate import evaluate_bundle

    real_run = Pipeline.run
    given: list[np.ndarray] = []

    def shape_scored_run(self: Pipeline, images: Any, explain: bool = True) -> Any:
        results = real_run(self, images, explain=explain)
        for img, r in zip(images, results, strict=True):
            given.append(img.pixels)
            if r.probability is not None:
                r.probability = img.pixels.shape[1] / sum(img.pixels.shape[:2])
        return results

    monkeypatch.setattr(Pipeline, "run", shape_scored_run)
    samples = read_manifest(_shape_coded_dataset(tmp_path / "data", 12))
    split = _split(range(0, 6), range(6, 8), range(8, 12))
    res = evaluate_bundle(phantom_bundle, samples, split, tmp_path / "report", device="cpu", n_boot=10,
                          montage_n=0, counterfactual=False)
    assert res["test"]["n"] == res["test_shape_normalised"]["n"] == 4
    assert res["test"]["positives"] == 2
    assert res["test"]["roc_auc"] == 1.0
    assert res["test_shape_normalised"]["roc_auc"] == 0.5  # every copy square: one score for all
    # the copies handed to the pipeline: each test image's largest centred square, at source resolution
    squares = [px for px in given if px.shape[0] == px.shape[1]]
    test = split.select(samples, "test")
    assert len(squares) == len(test)
    for s, sq in zip(test, squares, strict=True):
        px = load_any(s.file).pixels
        side = min(px.shape)
        top, left = (px.shape[0] - side) // 2, (px.shape[1] - side) // 2
        assert np.array_equal(sq, px[top:top + side, left:left + side]), s.key


def test_stage1_dice_is_against_the_manifest_masks(tmp_path: Path, phantom_bundle: Path,
                                                   one_thread: None) -> None:
    """Stage 1 fitted to phantoms matches their true masks, and not their complements put in the manifest."""
    from PIL import Image

    from training.datasets import patient_split, read_manifest
    from training.evaluate import evaluate_bundle
    from training.synthetic import make_phantom_dataset

    manifest = make_phantom_dataset(tmp_path / "data", patients=20, images_per_patient=1, size=320)
    samples = read_manifest(manifest)
    split = patient_split(samples)
    seg = split.select([s for s in samples if s.task == "segmentation"], "test")
    kw: dict[str, Any] = {"device": "cpu", "n_boot": 10, "montage_n": 0, "counterfactual": False}
    true = evaluate_bundle(phantom_bundle, samples, split, tmp_path / "true", **kw)["stage1"]
    assert true["n"] == len(seg) >= 2 and true["no_mask"] == 0
    assert true["dice"]["p10"] > 0.8 and true["iou"]["p10"] > 0.65
    for s in seg:  # the manifest's masks now mark everything but the lungs
        assert s.mask_file is not None
        with Image.open(s.mask_file) as im:
            inverted = 255 - np.asarray(im.convert("L"))
        Image.fromarray(inverted).save(s.mask_file)
    wrong = evaluate_bundle(phantom_bundle, samples, split, tmp_path / "wrong", **kw)["stage1"]
    assert wrong["n"] == len(seg)
    assert wrong["dice"]["p90"] < 0.2 and wrong["iou"]["p90"] < 0.15


def test_baselines_when_both_classes_are_on_every_side(tmp_path: Path, phantom_bundle: Path,
                                                       one_thread: None) -> None:
    """Every baseline is fitted and scored; with the label told by shape, the shape baseline is perfect."""
    from training.datasets import read_manifest
    from training.evaluate import evaluate_bundle

    samples = read_manifest(_shape_coded_dataset(tmp_path / "data", 16))
    split = _split(range(0, 8), range(8, 12), range(12, 16))
    res = evaluate_bundle(phantom_bundle, samples, split, tmp_path / "report", device="cpu", n_boot=10,
                          montage_n=0, counterfactual=False)
    base = res["baselines"]
    assert set(base) == {"shape", "pixels64", "texture"}
    for name, b in base.items():
        assert b["test_at_0.5"]["n"] == 4, name
        assert math.isfinite(b["test_at_0.5"]["roc_auc"]), name
        assert math.isfinite(b["val_roc_auc"]) and math.isfinite(b["threshold"]), name
    assert base["shape"]["test_at_0.5"]["roc_auc"] == 1.0
    assert base["shape"]["val_roc_auc"] == 1.0
    assert "baseline shape (threshold 0.5)" in (tmp_path / "report" / "report.md").read_text()


def test_baselines_are_left_out_when_a_side_lacks_a_class(tmp_path: Path, phantom_bundle: Path,
                                                          one_thread: None) -> None:
    """Validation holds normal patients only: no baseline can be thresholded, so none is reported."""
    from training.datasets import read_manifest
    from training.evaluate import evaluate_bundle

    samples = read_manifest(_shape_coded_dataset(tmp_path / "data", 12))
    split = _split([0, 1, 2, 3, 5, 7], [4, 6], range(8, 12))  # even patients are normal
    res = evaluate_bundle(phantom_bundle, samples, split, tmp_path / "report", device="cpu", n_boot=10,
                          montage_n=0, counterfactual=False)
    assert res["baselines"] == {}
    assert res["test"]["n"] == 4


def test_recalibrate_sets_the_threshold_on_validation_only(tmp_path: Path, phantom_bundle_whole: Path,
                                                           one_thread: None) -> None:
    """Flipping the test patients' labels changes the test metrics and leaves the threshold as it was; the
    threshold is the lowest validation positive's probability (target sensitivity 1)."""
    from inference.imaging import load_any
    from inference.pipeline import Pipeline
    from training.datasets import patient_split, read_manifest, save_split
    from training.synthetic import make_phantom_dataset

    manifest = make_phantom_dataset(tmp_path / "data", patients=20, images_per_patient=1, size=320)
    samples = read_manifest(manifest)
    split = patient_split(samples)
    split_file = save_split(split, tmp_path / "split.json")

    def evaluate(out: Path) -> dict[str, Any]:
        assert main(["evaluate", "--model", str(phantom_bundle_whole), "--data", str(manifest),
                     "--split", str(split_file), "--out", str(out), "--device", "cpu", "--recalibrate",
                     "--target-sensitivity", "1.0", "--bootstrap", "10", "--montage", "0",
                     "--no-counterfactual"]) == 0
        return json.loads((out / "metrics.json").read_text())

    first = evaluate(tmp_path / "first")
    test_ids = set(split.test)
    rows = _read_rows(manifest)
    for r in rows:
        if r["task"] == "classification" and r["patient_id"] in test_ids:
            r["label"] = {"covid": "normal", "normal": "covid"}[r["label"]]
    _write_manifest(manifest.parent, rows)
    flipped = evaluate(tmp_path / "flipped")

    assert flipped["threshold"] == first["threshold"]
    assert flipped["recalibrated_on_validation"] == first["recalibrated_on_validation"]
    a, b = first["test"], flipped["test"]
    assert a["n"] == b["n"] >= 2
    assert (b["tp"], b["fp"], b["tn"], b["fn"]) == (a["fp"], a["tp"], a["fn"], a["tn"])  # same scores
    assert b["roc_auc"] == pytest.approx(1 - a["roc_auc"]) and a["roc_auc"] != 0.5
    # the threshold from the validation positives, scored apart by the node's pipeline
    val_pos = [s for s in split.select(samples, "val") if s.task == "classification" and s.label == "covid"]
    pipeline = Pipeline.from_bundle(phantom_bundle_whole, device="cpu")
    probs = [r.probability for r in pipeline.run([load_any(s.file) for s in val_pos], explain=False)]
    assert len(probs) >= 2 and None not in probs
    assert first["threshold"] == pytest.approx(min(probs), rel=1e-6)
    assert first["threshold"] != pytest.approx(pipeline.bundle.threshold, abs=1e-6)
