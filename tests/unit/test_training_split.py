"""Data inputs and the patient-level split: a patient is never on two sides."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from training.datasets import (
    Sample,
    load_split,
    patient_split,
    read_labelled_folder,
    read_manifest,
    save_split,
)

pytestmark = pytest.mark.unit


def _samples(n_patients: int = 120) -> list[Sample]:
    out = []
    for p in range(n_patients):
        label = "covid" if p % 3 else "normal"
        source = ("nih", "ieee", "cxnet")[p % 3] if label == "covid" else "nih"
        for k in range(1 + p % 4):  # serial films: 1-4 images per patient
            out.append(Sample(file=Path(f"/x/{p}_{k}.png"), label=label, patient_id=f"{source}:{p}",
                              source=source))
        if p % 5 == 0:
            out.append(Sample(file=Path(f"/x/{p}_0.png"), label="mask", patient_id=f"{source}:{p}",
                              source=source, task="segmentation", mask_file=Path(f"/x/{p}_m.png")))
    return out


def test_split_never_shares_a_patient_and_keeps_ratios() -> None:
    samples = _samples()
    split = patient_split(samples, seed=3)
    sides = {s: set(getattr(split, s)) for s in ("train", "val", "test")}
    assert not sides["train"] & sides["val"] and not sides["train"] & sides["test"]
    assert not sides["val"] & sides["test"]
    assert set().union(*sides.values()) == {s.patient_id for s in samples}
    n = len({s.patient_id for s in samples})
    assert abs(len(sides["train"]) - 0.7 * n) <= 4 and abs(len(sides["test"]) - 0.1 * n) <= 4
    for side in sides:  # stratified: both labels on every side
        labels = Counter(s.label for s in split.select(samples, side) if s.task == "classification")
        assert labels["covid"] > 0 and labels["normal"] > 0
    # the three sides share the images out exactly, and every image of a patient goes with it, masks included
    chosen = {side: split.select(samples, side) for side in sides}
    assert sorted(map(id, samples)) == sorted(id(s) for side in chosen.values() for s in side)
    for side, picked in chosen.items():
        assert {s.patient_id for s in picked} == sides[side]
        assert all(s.patient_id in sides[side] for s in picked if s.task == "segmentation")
    assert any(s.task == "segmentation" for s in chosen["test"])  # the masks' side is checked, not assumed


def test_split_is_seeded() -> None:
    a, b = patient_split(_samples(), seed=1), patient_split(_samples(), seed=1)
    c = patient_split(_samples(), seed=2)
    assert a.test == b.test and a.val == b.val
    assert a.test != c.test


def test_split_json_round_trip_and_overlap_rejected(tmp_path: Path) -> None:
    split = patient_split(_samples(), seed=0)
    path = save_split(split, tmp_path / "split.json")
    again = load_split(path)
    assert again.train == split.train and again.test == split.test and again.counts == split.counts
    data = json.loads(path.read_text())
    data["test"].append(data["train"][0])
    path.write_text(json.dumps(data))
    with pytest.raises(AssertionError, match="two sides"):
        load_split(path)


def test_split_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="ratios"):
        patient_split(_samples(), ratios=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="samples"):
        patient_split([])


def test_read_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text(
        "file,label,task,source,patient_id,mask_file\n"
        "images/a.png,covid,classification,s1,s1:1,\n"
        "images/a.png,mask,segmentation,s1,s1:1,masks/a.png\n"
        "images/b.png,other,classification,s2,s2:7,\n"
        "dicom/c.dcm,other,dicom,d,d:1,\n")
    rows = read_manifest(tmp_path, labels=("covid", "normal"))
    assert [(r.label, r.task) for r in rows] == [("covid", "classification"), ("mask", "segmentation")]
    assert rows[1].mask_file == (tmp_path / "masks/a.png").resolve()
    assert rows[0].file.is_absolute() and rows[0].target == 1
    (tmp_path / "bad.csv").write_text("file,label\nx.png,covid\n")
    with pytest.raises(ValueError, match="patient_id"):
        read_manifest(tmp_path / "bad.csv")


def test_read_labelled_folder_by_file_and_by_uid(tmp_path: Path) -> None:
    from inference.phantom import make_dicom

    (tmp_path / "img").mkdir()
    make_dicom(tmp_path / "img" / "a.dcm", sop_instance_uid="1.2.3.4", PatientID="P1", shape=(64, 64))
    make_dicom(tmp_path / "img" / "b.dcm", sop_instance_uid="1.2.3.5", PatientID="P2", shape=(64, 64))
    (tmp_path / "by_file.csv").write_text("file,label\na.dcm,covid\nb.dcm,normal\n")
    rows = read_labelled_folder(tmp_path / "img", tmp_path / "by_file.csv")
    assert [(r.patient_id, r.label) for r in rows] == [("P1", "covid"), ("P2", "normal")]
    (tmp_path / "by_uid.csv").write_text("SOP_Instance_UID,label\n1.2.3.5,covid\n")
    rows = read_labelled_folder(tmp_path / "img", tmp_path / "by_uid.csv")
    assert rows[0].file.name == "b.dcm" and rows[0].key == "1.2.3.5"
    (tmp_path / "unknown.csv").write_text("sop_instance_uid,label\n9.9.9,covid\n")
    with pytest.raises(ValueError, match="not found"):
        read_labelled_folder(tmp_path / "img", tmp_path / "unknown.csv")
    (tmp_path / "badlabel.csv").write_text("file,label\na.dcm,maybe\n")
    with pytest.raises(ValueError, match="maybe"):
        read_labelled_folder(tmp_path / "img", tmp_path / "badlabel.csv")
