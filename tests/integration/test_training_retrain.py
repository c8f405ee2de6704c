"""Retraining on the node's own received instances: labels imported, fine-tune, compare, promote or refuse,
registry, roll back; the promoted bundle runs in the pipeline. And the whole loop with one trained bundle:
train, evaluate, predict, retrain, roll back; and training on a DICOM folder with a labels CSV."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from training.retrain import decide

pytestmark = pytest.mark.integration


def test_decide_promotes_only_when_not_worse() -> None:
    assert decide(0.90, 0.90, 0.0)[0] and decide(0.90, 0.89, 0.02)[0]
    ok, why = decide(0.90, 0.85, 0.02)
    assert not ok and "<" in why
    assert not decide(math.nan, 0.9, 0.5)[0] and not decide(0.9, math.nan, 0.5)[0]


def _received(tmp: Path, engine, n_patients: int = 12) -> list[tuple[str, str, str]]:  # noqa: ANN001
    """Phantom CRs spooled and enqueued as the listener would; returns (sop uid, accession, label)."""
    from dicom_node.config import WorkerSettings
    from dicom_node.queue import JobManager
    from inference.phantom import make_dicom

    jm = JobManager(engine, WorkerSettings())
    spool = tmp / "spool"
    spool.mkdir()
    out = []
    for p in range(n_patients):
        label = "covid" if p % 2 else "normal"
        for k in range(2):
            uid = f"1.2.826.0.1.3680043.10.999.{p}.{k}"
            acc = f"ACC{p:03d}{k}"
            ds = make_dicom(spool / f"{uid}.dcm", shape=(288, 272), opacity=0.8 if label == "covid" else 0.0,
                            seed=100 * p + k, sop_instance_uid=uid, PatientID=f"P{p}", AccessionNumber=acc)
            jm.enqueue(sop_instance_uid=uid, study_instance_uid=str(ds.StudyInstanceUID),
                       series_instance_uid=str(ds.SeriesInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                       calling_ae="PACS", calling_host="127.0.0.1", spool_path=str(spool / f"{uid}.dcm"))
            out.append((uid, acc, label))
    return out


def test_retrain_promote_refuse_rollback(tmp_path: Path, sqlite_url: str, phantom_bundle: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from dicom_node.config import load_settings
    from dicom_node.db import init_db, make_engine
    from inference.phantom import make_phantom
    from inference.pipeline import Pipeline
    from inference.types import XrayImage
    from training import registry
    from training.retrain import import_labels, local_samples, read_labels, retrain_once

    torch.set_num_threads(1)
    engine = make_engine(sqlite_url)
    init_db(engine)
    rows = _received(tmp_path, engine)
    csv_path = tmp_path / "labels.csv"
    # half the labels by SOP Instance UID, half by Accession Number; saved as a spreadsheet program saves
    # "CSV UTF-8": with a byte-order mark before the first column's name, and CRLF line ends
    lines = ["sop_instance_uid,accession_number,label"]
    lines += [f"{u},,{lab}" if i % 2 else f",{a},{lab}" for i, (u, a, lab) in enumerate(rows)]
    csv_path.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8-sig"))
    settings = load_settings(None, {"storage": {"data_dir": str(tmp_path / "node")},
                                    "database": {"url": sqlite_url},
                                    "retrain": {"min_labelled": 10, "epochs": 1, "margin": 1.0}}, environ={})
    assert import_labels(settings, csv_path) == {"imported": len(rows), "total": len(rows)}
    samples = local_samples(engine, read_labels(settings))
    assert len(samples) == len(rows) and {s.patient_id for s in samples} == {f"local:P{p}" for p in range(12)}

    # the same labelled instances feed `cxr-node train --data node`
    from dicom_node.cli import main

    monkeypatch.setenv("CXRNODE_STORAGE_DATA_DIR", str(tmp_path / "node"))
    monkeypatch.setenv("CXRNODE_DATABASE_URL", sqlite_url)
    train = ["train", "--data", "node", "--stage", "2", "--fine-tune", "--arch", "mobilenet_v2",
             "--base-model", str(phantom_bundle), "--out", str(tmp_path / "run"), "--quick",
             "--epochs", "1", "--device", "cpu", "--style-augment", "0.25", "--artefact-augment", "0.3",
             "--equalize"]
    assert main(train) == 0
    assert (tmp_path / "run" / "bundle" / "model.json").is_file()
    # `--resume` continues from the run's checkpoints: the finished network is not trained again. A bundle
    # never changes in place, so the finished run's bundle is moved away first, as after an interrupted run.
    checkpoints = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").glob("*.pt")}
    assert checkpoints
    (tmp_path / "run" / "bundle").rename(tmp_path / "first-bundle")
    assert main([*train, "--resume"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").glob("*.pt")} == checkpoints
    card = json.loads((tmp_path / "run" / "bundle" / "model.json").read_text())
    assert card["normalisation"]["equalize"] is True
    trained = card["training_data"]
    assert trained["style_augment"] == 0.25 and trained["source_adversary"] == 0.0
    assert trained["artefact_augment"] == 0.3

    registry.register(engine, phantom_bundle, status="retired")
    first = registry.promote(engine, registry.list_versions(engine)[0]["version"])
    # the scheduler's job (retrain.cron) runs this round: the same call the APScheduler trigger makes
    from dicom_node.scheduler import run_retrain

    out = run_retrain(settings, engine)
    # promotion: each class has a patient on the held-out side (P3 and P6 by their ids' hashes), so ROC AUC
    # is defined; with margin 1.0 any candidate reaches current - margin
    assert out["status"] == "promoted", out
    assert out["promote"] and out["held_out"] == 4
    # both scores are those of the two bundles on the held-out patients of the run's split
    from sklearn.metrics import roc_auc_score

    from inference.imaging import load_dicom

    split = json.loads((tmp_path / "node" / "training" / "runs" / out["version"] / "split.json").read_text())
    held_out = [s for s in samples if s.patient_id in set(split["test"])]
    assert len(held_out) == 4
    for key, path in (("current", phantom_bundle), ("candidate", Path(out["bundle"]))):
        results = Pipeline.from_bundle(path, device="cpu").run([load_dicom(s.file) for s in held_out],
                                                               explain=False)
        y = [s.label == "covid" for s in held_out]
        assert out[key] == pytest.approx(roc_auc_score(y, [r.probability for r in results])), key
    versions = {v["version"]: v for v in registry.list_versions(engine)}
    assert versions[out["version"]]["status"] == "current"
    assert versions[first["promoted"]]["status"] == "retired"
    assert versions[out["version"]]["device_uid"] != versions[first["promoted"]]["device_uid"]
    assert versions[out["version"]]["metrics"]["decision"]["held_out"] > 0
    run = Path(versions[out["version"]]["metrics"]["run"])
    assert (run / "split.json").is_file() and not (run / "checkpoints").exists()  # no 170 MB left per round
    # the sides of this round's patients are kept for the next rounds
    split = json.loads((run / "split.json").read_text())
    sides = json.loads((Path(settings.storage.data_dir) / "training" / "sides.json").read_text())
    assert {p: side for side in ("train", "val", "test") for p in split[side]}.items() <= sides.items()

    # the promoted bundle serves
    img, _ = make_phantom((288, 272), opacity=0.5, seed=7)
    res = Pipeline.from_bundle(out["bundle"], device="cpu").run(
        [XrayImage(pixels=img, source="x", meta={"modality": "CR", "body_part": "CHEST"})], explain=False)
    assert res[0].model_version == out["version"]

    # too few patients: 4 of the 6 covid patients relabelled `other` (excluded) leave 2 covid patients, too
    # few for a training, a validation and a held-out side with both classes; the round is skipped before
    # any training, saying so, and leaves no run folder and no registry row
    dropped = {f"P{p}" for p in (1, 3, 5, 7)}
    relabel = tmp_path / "relabel.csv"
    relabel.write_text("sop_instance_uid,label\n" + "".join(
        f"{u},other\n" for u, a, lab in rows if lab == "covid" and f"P{int(a[3:6])}" in dropped))
    assert import_labels(settings, relabel)["imported"] == 8
    held = local_samples(engine, read_labels(settings))
    assert {s.patient_id for s in held if s.label == "covid"} == {"local:P9", "local:P11"}
    assert len(held) == 16 and not {s.patient_id for s in held} & {f"local:{p}" for p in dropped}
    runs = set((tmp_path / "node" / "training" / "runs").iterdir())
    versions_before = registry.list_versions(engine)
    out2 = retrain_once(settings, engine=engine, device="cpu", quick=True)
    assert out2["status"] == "skipped", out2
    assert out2["reason"] == ("2 covid patient(s) (4 instances): 3 per class are needed, one each for "
                              "training, validation and the held-out set")
    assert out2["labelled"] == 16 and out2["left_out"] == {}  # the shadowed accession labels matched
    assert set((tmp_path / "node" / "training" / "runs").iterdir()) == runs
    assert registry.list_versions(engine) == versions_before
    assert registry.current(engine)["version"] == out["version"]

    before = registry.current(engine)["version"]
    back = registry.rollback(engine)
    assert back == {"rolled_back": out["version"], "current": first["promoted"]}
    assert registry.current(engine)["version"] == first["promoted"]
    assert {v["version"]: v["status"] for v in registry.list_versions(engine)}[before] == "rejected"
    with pytest.raises(LookupError):
        registry.promote(engine, "no-such-version")
    with pytest.raises(ValueError, match="already current"):
        registry.promote(engine, back["current"])


def test_retrain_refuses_a_candidate_worse_than_the_current_model(tmp_path: Path, sqlite_url: str,
                                                                   phantom_bundle_whole: Path) -> None:
    """A fine-tune that ends worse on the held-out patients is refused with both scores recorded, and the
    current model keeps serving. Round 1 fine-tunes the random ResNet18 into a model that ranks the
    held-out phantoms perfectly (promoted); round 2 fine-tunes it with a learning rate far too high, which
    leaves a network that answers the same for every image (ROC AUC 0.5): refused at margin 0."""
    import torch

    from dicom_node.config import load_settings
    from dicom_node.db import init_db, make_engine
    from training import registry
    from training.retrain import import_labels, retrain_once

    torch.set_num_threads(1)
    engine = make_engine(sqlite_url)
    init_db(engine)
    rows = _received(tmp_path, engine, n_patients=40)  # 20 per label: 1 each held out, 2 + 2 images
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("sop_instance_uid,label\n" + "".join(f"{u},{lab}\n" for u, _, lab in rows))
    settings = load_settings(None, {"storage": {"data_dir": str(tmp_path / "node")},
                                    "database": {"url": sqlite_url},
                                    "retrain": {"min_labelled": 10, "epochs": 8, "margin": 0.0}}, environ={})
    import_labels(settings, csv_path)
    registry.register(engine, phantom_bundle_whole, status="retired")
    registry.promote(engine, registry.list_versions(engine)[0]["version"])

    good = retrain_once(settings, engine=engine, device="cpu", lr=0.002)
    assert good["status"] == "promoted" and good["held_out"] == 4 and good["candidate"] == 1.0, good

    one_epoch = settings.model_copy(update={"retrain": settings.retrain.model_copy(update={"epochs": 1})})
    worse = retrain_once(one_epoch, engine=engine, device="cpu", lr=0.5)
    assert worse["status"] == "rejected" and not worse["promote"], worse
    assert worse["current_version"] == good["version"] and worse["current"] == 1.0
    assert worse["candidate"] < worse["current"]
    assert worse["reason"] == f"candidate {worse['candidate']:.4f} < current 1.0000 - margin 0.0"
    assert registry.current(engine)["version"] == good["version"]
    row = {v["version"]: v for v in registry.list_versions(engine)}[worse["version"]]
    assert row["status"] == "rejected"
    decision = row["metrics"]["decision"]
    assert (decision["current"], decision["candidate"]) == (1.0, worse["candidate"])
    held = row["metrics"]["held_out"]
    assert held["current"]["metrics"]["roc_auc"] == 1.0 and held["candidate"]["metrics"]["n"] == 4


def test_retrain_skips_without_enough_labels(tmp_path: Path, sqlite_url: str) -> None:
    from dicom_node.config import load_settings
    from dicom_node.db import init_db, make_engine
    from training.retrain import retrain_once

    engine = make_engine(sqlite_url)
    init_db(engine)
    settings = load_settings(None, {"storage": {"data_dir": str(tmp_path)}, "database": {"url": sqlite_url}},
                             environ={})
    out = retrain_once(settings, engine=engine, device="cpu")
    assert out["status"] == "skipped" and "needed" in out["reason"]


def test_train_passes_init_weights_on_and_refuses_them_with_fine_tune(
        tmp_path: Path, phantom_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`cxr-node train --init-weights` reaches the build: a missing file, or one given with --fine-tune, is a
    one-line error before any data is read or anything is trained."""
    from dicom_node.cli import main

    base = ["train", "--data", str(tmp_path / "no-data"), "--stage", "2", "--arch", "mobilenet_v2",
            "--base-model", str(phantom_bundle), "--out", str(tmp_path / "run"), "--device", "cpu"]
    assert main([*base, "--init-weights", str(tmp_path / "absent.safetensors")]) != 0
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "enc.safetensors").write_bytes(b"x")
    assert main([*base, "--fine-tune", "--init-weights", str(tmp_path / "enc.safetensors")]) != 0
    assert "fine-tuning run starts from its base model's weights" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_whole_loop_train_evaluate_predict_retrain_roll_back(tmp_path: Path, sqlite_url: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """One bundle through every command: `cxr-node train` (both stages, LungVAE, ResNet18) on a manifest of
    phantoms; `evaluate` on its split gives the build's own test ROC AUC; `predict` on the test images gives
    the same ranking; the node retrains from it on received instances and promotes; roll back returns
    to it."""
    import csv

    import torch
    from sklearn.metrics import roc_auc_score

    from dicom_node.cli import main
    from dicom_node.config import load_settings
    from dicom_node.db import init_db, make_engine
    from inference.bundle import ModelBundle
    from training import registry
    from training.retrain import import_labels, retrain_once
    from training.synthetic import make_phantom_dataset

    torch.set_num_threads(1)
    make_phantom_dataset(tmp_path / "data", patients=30, images_per_patient=2, size=300)
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "data"), "--stage", "both", "--seg-arch", "lungvae",
                 "--arch", "resnet18", "--mode", "whole", "--size", "64", "--seg-size", "64", "--epochs", "8",
                 "--epochs-seg", "8", "--device", "cpu", "--out", str(run)]) == 0
    built = json.loads((run / "results.json").read_text())
    bundle = ModelBundle.load(run / "bundle")
    assert bundle.segmenter_arch == "lungvae" and bundle.classifier_arch == "resnet18"
    assert built["stage1"]["chosen"] == "lungvae" and built["stage1"]["by_arch"]["lungvae"]["val_dice"] > 0.7

    assert main(["evaluate", "--model", str(run / "bundle"), "--data", str(tmp_path / "data"),
                 "--split", str(run / "split.json"), "--out", str(tmp_path / "report"), "--device", "cpu",
                 "--bootstrap", "50", "--montage", "2", "--no-counterfactual"]) == 0
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert report["threshold"] == pytest.approx(bundle.threshold)
    assert report["test"]["n"] == built["test"]["n"] == 8 and report["not_assessable"] == {}
    # the node's pipeline on the shipped (float16) bundle ranks the test images as the build measured them
    assert report["test"]["roc_auc"] == pytest.approx(built["test"]["roc_auc"], abs=0.02)
    assert report["stage1"]["dice"]["mean"] > 0.7

    test_patients = set(json.loads((run / "split.json").read_text())["test"])
    with (tmp_path / "data" / "manifest.csv").open() as fh:
        labels = {str(tmp_path / "data" / r["file"]): r["label"] for r in csv.DictReader(fh)
                  if r["task"] == "classification" and r["patient_id"] in test_patients}
    assert main(["predict", "--model", str(run / "bundle"), "--device", "cpu", "--out",
                 str(tmp_path / "preds.csv"), *labels]) == 0
    with (tmp_path / "preds.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["file"] for r in rows} == set(labels)
    y = [labels[r["file"]] == "covid" for r in rows]
    predicted = roc_auc_score(y, [float(r["probability"]) for r in rows])
    assert predicted == pytest.approx(report["test"]["roc_auc"])

    engine = make_engine(sqlite_url)
    init_db(engine)
    received = _received(tmp_path, engine)
    (tmp_path / "labels.csv").write_text("sop_instance_uid,label\n" + "".join(f"{u},{lab}\n"
                                                                             for u, _, lab in received))
    settings = load_settings(None, {"storage": {"data_dir": str(tmp_path / "node")},
                                    "database": {"url": sqlite_url},
                                    "retrain": {"min_labelled": 10, "epochs": 2, "margin": 1.0}}, environ={})
    import_labels(settings, tmp_path / "labels.csv")
    registry.register(engine, run / "bundle", status="retired")
    trained = registry.promote(engine, bundle.version)["promoted"]
    out = retrain_once(settings, engine=engine, device="cpu")
    assert out["status"] == "promoted" and out["current_version"] == trained, out
    assert ModelBundle.load(out["bundle"]).segmenter_arch == "lungvae"  # stage 1 kept, stage 2 fine-tuned
    assert registry.rollback(engine) == {"rolled_back": out["version"], "current": trained}
    assert registry.current(engine)["path"] == str(run / "bundle")
    engine.dispose()


def test_train_on_a_dicom_folder_with_a_labels_csv(tmp_path: Path, phantom_bundle_whole: Path) -> None:
    """`cxr-node train --data DICOM_FOLDER --labels CSV`: rows by file path and by SOP Instance UID, patients
    from the headers; every labelled image is used once, no patient on two sides, and the bundle serves."""
    import torch

    from dicom_node.cli import main
    from inference.bundle import ModelBundle
    from inference.phantom import make_dicom

    torch.set_num_threads(1)
    folder = tmp_path / "dicoms"
    (folder / "sub").mkdir(parents=True)
    rows = ["file,sop_instance_uid,label"]
    for p in range(12):
        label = "covid" if p % 2 else "normal"
        for k in range(2):
            uid = f"1.2.826.0.1.3680043.10.998.{p}.{k}"
            name = f"sub/p{p}_{k}.dcm"
            make_dicom(folder / name, shape=(288, 272), opacity=0.8 if label == "covid" else 0.0,
                       seed=10 * p + k, sop_instance_uid=uid, PatientID=f"PAT{p}")
            rows.append(f"{name},,{label}" if k else f",{uid},{label}")
    (folder / "notes.txt").write_text("not an image")  # ignored: only labelled files are read
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    assert main(["train", "--data", str(folder), "--labels", str(tmp_path / "labels.csv"), "--stage", "2",
                 "--base-model", str(phantom_bundle_whole), "--arch", "resnet18", "--mode", "whole",
                 "--size", "64", "--epochs", "1", "--quick", "--device", "cpu", "--out", str(run)]) == 0
    split = json.loads((run / "split.json").read_text())
    sides = [set(split[s]) for s in ("train", "val", "test")]
    assert set.union(*sides) == {f"PAT{p}" for p in range(12)}  # patients from the DICOM headers
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    counts = json.loads((run / "results.json").read_text())["split"]
    assert sum(n for side in counts.values() for label, n in side.items() if label != "mask") == 24
    assert ModelBundle.load(run / "bundle").classifier_arch == "resnet18"
