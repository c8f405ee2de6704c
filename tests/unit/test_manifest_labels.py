"""Manifest labels the code does not know are refused, naming them; train and evaluate refuse a split side
without both classes before any work; evaluate tests a bundle on its own test patients and says how many of
its test patients the bundle was trained on."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from dicom_node.cli import main
from training.datasets import Sample, Split, patient_split, read_manifest, save_split

pytestmark = pytest.mark.unit


def _rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _phantom_data(root: Path, patients: int = 20) -> Path:
    """A phantom data set in the manifest format: patient p (``synth_x:p``) is covid when p is odd."""
    from training.synthetic import make_phantom_dataset

    return make_phantom_dataset(root, patients=patients, images_per_patient=1, size=320)


def _pid(p: int) -> str:
    return f"{('synth_a', 'synth_b')[(p // 2) % 2]}:{p}"


# ------------------------------------------------------------------------------------------ the manifest


def test_labels_the_manifest_format_does_not_have_are_refused_naming_them(tmp_path: Path) -> None:
    from training.synthetic import write_manifest

    labels = ["COVID-19"] * 3 + ["Normal", "covid", "other"]
    rows = [{"file": f"images/{i}.png", "label": label, "task": "classification", "source": "s",
             "patient_id": f"s:{i}"} for i, label in enumerate(labels)]
    rows.append({"file": "images/0.png", "label": "mask", "task": "segmentation", "source": "s",
                 "patient_id": "s:0", "mask_file": "masks/0.png"})
    manifest = write_manifest(tmp_path, rows)
    with pytest.raises(ValueError) as err:
        read_manifest(manifest)
    text = str(err.value)
    assert str(manifest) in text
    assert "'COVID-19' (3 classification rows)" in text and "'Normal' (1 classification row)" in text
    assert "'covid'" not in text and "'other'" not in text and "'mask'" not in text  # known ones pass

    rows[-1]["task"] = "Segmentation"
    rows = [r for r in rows if r["label"] in ("covid", "other", "mask")]
    write_manifest(tmp_path, rows)
    with pytest.raises(ValueError, match=r"unknown task\(s\) 'Segmentation' \(1 row\)"):
        read_manifest(manifest)


@pytest.mark.data
def test_the_shared_manifest_has_only_known_labels(shared_data: Path) -> None:
    samples = read_manifest(shared_data)
    assert {s.label for s in samples} == {"covid", "normal", "other", "mask"}


# ------------------------------------------------------------------------------- one class is refused early


def _samples(labels: dict[int, str]) -> list[Sample]:
    return [Sample(file=Path(f"/x/{p}.png"), label=label, patient_id=f"s:{p}", source="s")
            for p, label in labels.items()]


def test_a_split_without_both_classes_on_every_side_is_refused() -> None:
    with pytest.raises(ValueError, match=r"the data has no normal image \(.*30 covid\)"):
        patient_split(_samples({p: "covid" for p in range(30)}))
    two_normals = _samples({**{p: "covid" for p in range(30)}, 30: "normal", 31: "normal"})
    with pytest.raises(ValueError, match="lacks a class: .*test has no normal image"):
        patient_split(two_normals)
    split = patient_split(_samples({p: ("covid", "normal")[p % 2] for p in range(30)}))  # both: fine
    assert set(split.counts["test"]) == {"covid", "normal"}
    masks_only = [Sample(file=Path(f"/x/{p}.png"), label="mask", patient_id=f"s:{p}", task="segmentation",
                         mask_file=Path(f"/x/{p}_m.png")) for p in range(10)]
    assert len(patient_split(masks_only).train) == 7  # a stage 1 split has no classes to check


def test_train_refuses_one_class_before_training(tmp_path: Path, phantom_bundle: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from training.synthetic import write_manifest

    manifest = _phantom_data(tmp_path / "data")
    rows = [{**r, "label": "other"} if r["label"] == "normal" else r for r in _rows(manifest)]
    write_manifest(manifest.parent, rows)  # covid and other: nothing to tell covid from
    out = tmp_path / "run"
    rc = main(["train", "--data", str(manifest), "--out", str(out), "--quick", "--device", "cpu",
               "--stage", "2", "--arch", "mobilenet_v2", "--epochs", "1",
               "--base-model", str(phantom_bundle)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "the data has no normal image" in err and "10 covid" in err
    assert not (out / "checkpoints").exists() and not (out / "bundle").exists()


def test_evaluate_refuses_a_test_side_with_one_class(tmp_path: Path, phantom_bundle: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    manifest = _phantom_data(tmp_path / "data")
    samples = read_manifest(manifest)
    covid = [_pid(p) for p in range(1, 20, 2)]
    normal = [_pid(p) for p in range(0, 20, 2)]
    split = save_split(Split(train=covid[:6] + normal[:8], val=covid[6:8] + normal[8:], test=covid[8:]),
                       tmp_path / "split.json")
    assert {s.label for s in samples if s.patient_id in covid[8:] and s.task == "classification"} == {"covid"}
    out = tmp_path / "report"
    rc = main(["evaluate", "--model", str(phantom_bundle), "--data", str(manifest), "--split", str(split),
               "--out", str(out), "--device", "cpu", "--bootstrap", "10", "--montage", "0",
               "--no-counterfactual"])
    assert rc == 1
    assert "lacks a class: test has no normal image" in capsys.readouterr().err
    assert not (out / "metrics.json").exists()


# ---------------------------------------------------------------------------- evaluate and the bundle's split


def _evaluate(tmp_path: Path, bundle: Path, data: Path, out: Path, *extra: str) -> dict[str, Any]:
    from training.evaluate import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", str(bundle), "--data", str(data), "--out", str(out),
                              "--device", "cpu", "--bootstrap", "10", "--montage", "0", "--no-counterfactual",
                              *extra])
    assert run(args, None) == 0
    metrics: dict[str, Any] = json.loads((out / "metrics.json").read_text())
    return metrics


def test_evaluate_uses_the_bundles_own_test_patients_and_counts_seen_ones(
        tmp_path: Path, phantom_bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    manifest = _phantom_data(tmp_path / "data")
    bundle = tmp_path / "bundle"
    shutil.copytree(phantom_bundle, bundle)
    save_split(Split(train=[_pid(p) for p in range(10, 20)], val=[_pid(p) for p in range(6, 10)],
                     test=[_pid(p) for p in range(6)]), bundle / "split.json")

    own = _evaluate(tmp_path, bundle, manifest, tmp_path / "own")
    assert own["test"]["n"] + sum(own["not_assessable"].values()) == 6  # the bundle's 6 test patients
    assert own["split"]["test_patients"] == 6 and "the bundle's own split" in own["split"]["from"]
    assert own["split"]["in_bundle_train"] == own["split"]["in_bundle_val"] == 0
    report = (tmp_path / "own" / "report.md").read_text()
    assert "6 test patients, none of them in the bundle's training or validation split" in report
    assert not [r for r in caplog.records if getattr(r, "action", "") == "evaluate_test_seen_in_training"]

    # a split of another making: two of its test patients trained the model, one validated it
    other = save_split(Split(train=[_pid(p) for p in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14, 15, 16, 17)],
                             val=[_pid(p) for p in (18, 19)], test=[_pid(p) for p in (10, 11, 12, 13)]),
                       tmp_path / "other.json")
    seen = _evaluate(tmp_path, bundle, manifest, tmp_path / "seen", "--split", str(other))
    own_split = str(bundle / "split.json")
    assert seen["split"] == {"from": str(other), "test_patients": 4, "bundle_split": own_split,
                             "in_bundle_train": 4, "in_bundle_val": 0}
    report = (tmp_path / "seen" / "report.md").read_text()
    assert "**Warning: 4 of 4 test patients were seen in training**" in report
    warned = [r for r in caplog.records if getattr(r, "action", "") == "evaluate_test_seen_in_training"]
    assert len(warned) == 1 and warned[0].levelname == "WARNING"


def test_evaluate_without_a_bundle_split_says_it_cannot_check(tmp_path: Path, phantom_bundle: Path) -> None:
    manifest = _phantom_data(tmp_path / "data")
    assert not (phantom_bundle / "split.json").exists()
    res = _evaluate(tmp_path, phantom_bundle, manifest, tmp_path / "report")
    assert res["split"]["from"] == "a new patient split (seed 0)"
    assert res["split"]["in_bundle_train"] is None and res["split"]["bundle_split"] is None
    assert "carries no split.json" in (tmp_path / "report" / "report.md").read_text()
