"""Retraining that must not do harm: roll back only to a bundle that loads; one round at a time, a candidate
promoted only over the model it was compared with, each round in a version and run folder of its own; a
held-out side that keeps the patients an earlier round trained on out; rounds that leave out what they cannot
use and skip, saying why, what they cannot do; label files that contradict themselves refused."""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_training_retrain import _received

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _settings(tmp_path: Path, db_url: str, **retrain: Any) -> Any:
    from dicom_node.config import load_settings

    return load_settings(None, {"storage": {"data_dir": str(tmp_path / "node")}, "database": {"url": db_url},
                                "retrain": {"min_labelled": 10, "epochs": 1, "margin": 1.0, **retrain}},
                         environ={})


def _label(tmp_path: Path, settings: Any, rows: list[tuple[str, str, str]], name: str = "labels.csv") -> None:
    from training.retrain import import_labels

    (tmp_path / name).write_text("sop_instance_uid,label\n" + "".join(f"{u},{lab}\n" for u, _, lab in rows))
    import_labels(settings, tmp_path / name)


def _node(tmp_path: Path, db_url: str, bundle: Path, **retrain: Any) -> tuple[Any, Any, list]:
    """A node database with 12 received patients (odd ones covid), all labelled, and ``bundle`` current."""
    from dicom_node.db import init_db, make_engine
    from training import registry

    engine = make_engine(db_url)
    init_db(engine)
    rows = _received(tmp_path, engine)
    settings = _settings(tmp_path, db_url, **retrain)
    _label(tmp_path, settings, rows)
    registry.register(engine, bundle, status="retired")
    registry.promote(engine, registry.list_versions(engine)[0]["version"])
    return settings, engine, rows


def _versions(engine: Any) -> dict[str, str]:
    from training import registry

    return {v["version"]: v["status"] for v in registry.list_versions(engine)}


# --- 1. roll back only to a bundle that loads ---------------------------------------------------------------

def test_rollback_to_a_bundle_that_no_longer_loads_is_refused(tmp_path: Path, sqlite_url: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The worker could not load it and would go on serving the version rolled back from, while the registry
    and `cxr-node status` named the broken one: refused, naming the file, the registry as it was."""
    from dicom_node.cli import main
    from dicom_node.db import init_db, make_engine
    from inference.bundle import make_random_bundle
    from training import registry

    engine = make_engine(sqlite_url)
    init_db(engine)
    for version in ("1.0.0", "1.1.0"):
        registry.register(engine, make_random_bundle(tmp_path / version, seg_size=32, cls_size=32,
                                                     version=version))
        registry.promote(engine, version)
    (tmp_path / "1.0.0" / "classifier.safetensors").unlink()
    before = registry.list_versions(engine)
    node = ["--data-dir", str(tmp_path / "node"), "--db-url", sqlite_url]
    assert main(["models", *node, "--rollback"]) == 1
    err = capsys.readouterr().err
    assert "cannot roll back from 1.1.0: model version 1.0.0 cannot be loaded" in err, err
    assert "missing weights file classifier.safetensors" in err, err
    assert registry.list_versions(engine) == before
    assert registry.current(engine)["version"] == "1.1.0"  # type: ignore[index]
    with pytest.raises(ValueError, match="cannot be loaded"):
        registry.rollback(engine)
    assert _versions(engine) == {"1.0.0": "retired", "1.1.0": "current"}
    engine.dispose()


# --- 2. one round at a time; promotion only over the model compared with; versions of their own -------------

def test_a_candidate_is_not_promoted_over_a_model_it_was_not_compared_with(
        tmp_path: Path, sqlite_url: str, phantom_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the round scores its candidate, another round (or an operator) promotes another version: the
    candidate, compared with the version before, is refused and recorded as rejected with the reason; the
    other version stays current."""
    import torch

    from inference.bundle import make_random_bundle
    from training import registry
    from training import retrain as retrain_module

    torch.set_num_threads(1)
    settings, engine, _ = _node(tmp_path, sqlite_url, phantom_bundle)
    compared_with = registry.current(engine)["version"]  # type: ignore[index]
    other = make_random_bundle(tmp_path / "other", seg_size=64, cls_size=64, version="0.0.1-other")
    registry.register(engine, other)
    real_score = retrain_module._score
    calls: list[Path] = []

    def score(bundle: Path, *args: Any) -> dict[str, Any]:
        if not calls:
            registry.promote(engine, "0.0.1-other")
        calls.append(bundle)
        return real_score(bundle, *args)

    monkeypatch.setattr(retrain_module, "_score", score)
    out = retrain_module.retrain_once(settings, engine=engine, device="cpu", quick=True)
    assert len(calls) == 2
    assert out["status"] == "rejected" and not out["promote"], out
    assert out["reason"] == (f"not promoted: model version {out['version']} was compared with "
                             f"{compared_with}, but the current model is now 0.0.1-other")
    assert registry.current(engine)["version"] == "0.0.1-other"  # type: ignore[index]
    row = {v["version"]: v for v in registry.list_versions(engine)}[out["version"]]
    assert row["status"] == "rejected"
    assert row["metrics"]["decision"]["reason"] == out["reason"] and not row["metrics"]["decision"]["promote"]
    engine.dispose()


def test_rounds_in_the_same_second_get_their_own_version_and_run_folder(
        tmp_path: Path, sqlite_url: str, phantom_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Versions were named to the second: a second round in that second trained into the first one's run
    folder and crashed on its bundle folder."""
    import torch

    from training import retrain as retrain_module

    torch.set_num_threads(1)
    settings, engine, _ = _node(tmp_path, sqlite_url, phantom_bundle)

    class Frozen(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Frozen:
            return cls(2026, 11, 28, 4, 23, 4, tzinfo=UTC)

    monkeypatch.setattr(retrain_module, "dt", types.SimpleNamespace(datetime=Frozen, UTC=UTC))
    first = retrain_module.retrain_once(settings, engine=engine, device="cpu", quick=True)
    second = retrain_module.retrain_once(settings, engine=engine, device="cpu", quick=True)
    assert first["status"] == second["status"] == "promoted", (first, second)
    assert first["version"] != second["version"]
    for out in (first, second):
        assert out["version"].startswith("0.0.0-test-r20261128T042304-"), out
        assert Path(out["bundle"]).is_dir()
    assert second["current_version"] == first["version"]
    runs = tmp_path / "node" / "training" / "runs"
    assert {p.name for p in runs.iterdir()} == {first["version"], second["version"]}
    engine.dispose()


@pytest.mark.parametrize("failing", ["scoring", "registration"])
def test_a_round_that_fails_after_training_leaves_no_bundle_and_no_checkpoints(
        tmp_path: Path, sqlite_url: str, phantom_bundle: Path, monkeypatch: pytest.MonkeyPatch,
        failing: str) -> None:
    """A round that failed after training (the device out of memory while scoring, the database restarting
    at registration) left its bundle in models/, registered nowhere, and its checkpoints, for ever."""
    import torch

    from training import registry
    from training import retrain as retrain_module

    torch.set_num_threads(1)
    settings, engine, _ = _node(tmp_path, sqlite_url, phantom_bundle)

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{failing} failed")

    if failing == "scoring":
        monkeypatch.setattr(retrain_module, "_score", fail)
    else:
        monkeypatch.setattr(registry, "register", fail)
    with pytest.raises(RuntimeError, match=f"{failing} failed"):
        retrain_module.retrain_once(settings, engine=engine, device="cpu", quick=True)
    models = tmp_path / "node" / "models"
    assert [p.name for p in models.iterdir() if p.name.startswith("0.0.0-test-r")] == []
    [run] = (tmp_path / "node" / "training" / "runs").iterdir()
    assert (run / "split.json").is_file() and not (run / "checkpoints").exists()
    assert set(_versions(engine)) == {"0.0.0-test"}
    engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_promotions_over_the_same_current_model_never_both_succeed(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two rounds compared their candidates with the same current model and promote at the same moment: one
    succeeds, the other is refused, and one version is current. Both would pass a check made before the
    other's change was committed (on PostgreSQL, READ COMMITTED), so the check and the change are one
    transaction that excludes the other: here each waits (up to 3 s) for the other inside it."""
    import threading

    from dicom_node.db import init_db, make_engine
    from inference.bundle import make_random_bundle
    from training import registry

    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "postgres_url")
    engine = make_engine(url)
    init_db(engine)
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        registry.register(engine, make_random_bundle(tmp_path / version, seg_size=32, cls_size=32,
                                                     version=version))
    registry.promote(engine, "1.0.0")
    both_inside = threading.Barrier(2)
    real_check = registry._check_loads

    def check(row: Any) -> None:
        try:
            both_inside.wait(timeout=3)
        except threading.BrokenBarrierError:
            pass
        real_check(row)

    monkeypatch.setattr(registry, "_check_loads", check)
    outcomes: dict[str, object] = {}

    def promote(version: str) -> None:
        try:
            outcomes[version] = registry.promote(engine, version, expected_current="1.0.0")
        except registry.CurrentChanged as exc:
            outcomes[version] = exc

    threads = [threading.Thread(target=promote, args=(v,)) for v in ("1.1.0", "1.2.0")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(outcomes) == 2, outcomes
    refused = [v for v, o in outcomes.items() if isinstance(o, registry.CurrentChanged)]
    assert len(refused) == 1, outcomes
    [won] = {"1.1.0", "1.2.0"} - set(refused)
    assert str(outcomes[refused[0]]) == (f"model version {refused[0]} was compared with 1.0.0, but the "
                                         f"current model is now {won}")
    assert _versions(engine) == {"1.0.0": "retired", won: "current", refused[0]: "candidate"}
    engine.dispose()


@contextmanager
def _lock_held_elsewhere(data_dir: Path, db_url: str) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the retraining lock (for ``data_dir`` and ``db_url``) until it is killed."""
    script = ("import sys, time\n"
              "from dicom_node.config import load_settings\n"
              "from dicom_node.db import make_engine\n"
              "from training.sides import round_lock\n"
              "settings = load_settings(None, {'storage': {'data_dir': sys.argv[1]}, "
              "'database': {'url': sys.argv[2]}}, environ={})\n"
              "with round_lock(settings, make_engine(sys.argv[2])):\n"
              "    print('held', flush=True)\n"
              "    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(data_dir), db_url], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready and proc.stdout.readline().strip() == "held", proc.stderr.read() if proc.stderr else ""
        yield proc
    finally:
        proc.kill()
        proc.wait(30)


def _kill(proc: subprocess.Popen[str]) -> None:
    """Kill as a crash would: no clean-up runs in the process."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def test_a_round_is_skipped_while_another_runs_and_a_crashed_one_blocks_nothing(
        tmp_path: Path, sqlite_url: str) -> None:
    from dicom_node.db import init_db, make_engine
    from training.retrain import retrain_once
    from training.sides import round_lock

    engine = make_engine(sqlite_url)
    init_db(engine)
    settings = _settings(tmp_path, sqlite_url)
    with round_lock(settings, engine):  # a round of this process (e.g. the scheduled one) runs
        out = retrain_once(settings, engine=engine, device="cpu")
    assert out["status"] == "skipped", out
    held = "the retraining lock is held (retraining round: pid"
    assert out["reason"].startswith(f"{held} {os.getpid()} on "), out
    with _lock_held_elsewhere(tmp_path / "node", sqlite_url) as proc:
        out = retrain_once(settings, engine=engine, device="cpu")
        assert out["status"] == "skipped", out
        assert out["reason"].startswith(f"{held} {proc.pid} on "), out
        _kill(proc)
        out = retrain_once(settings, engine=engine, device="cpu")
        assert out["status"] == "skipped" and out["reason"] == "0 labelled local instances, 10 needed", out
    engine.dispose()


def test_retention_waits_for_a_round_started_by_hand(tmp_path: Path, sqlite_url: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """serve's scheduled retention deleted the files a round started with `cxr-node retrain` was reading (the
    round crashed after training, leaving an unregistered bundle): it is postponed while a round runs."""
    from dicom_node.db import init_db, make_engine
    from dicom_node.scheduler import run_retention
    from training.retrain import retrain_once
    from training.sides import round_lock

    engine = make_engine(sqlite_url)
    init_db(engine)
    settings = _settings(tmp_path, sqlite_url)
    caplog.set_level(logging.WARNING, logger="dicom_node.scheduler")
    with _lock_held_elsewhere(tmp_path / "node", sqlite_url) as proc:
        out = run_retention(settings, engine)
        assert out["postponed"].startswith(f"the retraining lock is held (retraining round: pid {proc.pid}")
        said = [r.action for r in caplog.records if r.name == "dicom_node.scheduler"]
        assert said == ["retention_postponed"]
        _kill(proc)
    assert "postponed" not in run_retention(settings, engine)
    with round_lock(settings, engine, holder="retention run"):  # a round started during a retention run
        assert retrain_once(settings, engine=engine, device="cpu")["reason"].startswith(
            "the retraining lock is held (retention run: pid")
    engine.dispose()


def test_rounds_on_one_postgresql_database_exclude_each_other(tmp_path: Path, postgres_url: str) -> None:
    """Two nodes (their own data folders) on one PostgreSQL database: while one runs a round, the other's is
    skipped; when the first dies, its lock goes with its connection."""
    from dicom_node.db import init_db, make_engine
    from training.retrain import retrain_once

    engine = make_engine(postgres_url)
    init_db(engine)
    settings = _settings(tmp_path, postgres_url)
    with _lock_held_elsewhere(tmp_path / "other-node", postgres_url) as proc:
        out = retrain_once(settings, engine=engine, device="cpu")
        assert out["status"] == "skipped", out
        held = "a retraining round or retention run holds the lock on database postgresql"
        assert out["reason"].startswith(held), out
        _kill(proc)
        out = retrain_once(settings, engine=engine, device="cpu")
        assert out["status"] == "skipped" and out["reason"] == "0 labelled local instances, 10 needed", out
    engine.dispose()


# --- 3. the held-out side stays held out --------------------------------------------------------------------

def test_no_patient_a_round_trained_on_is_held_out_in_the_next(tmp_path: Path, sqlite_url: str,
                                                               phantom_bundle: Path) -> None:
    """Between two rounds four more patients are labelled. With the split redrawn each round, patients P6
    and P7, on the first round's training side, were on the second's held-out side, scored there by a
    current model trained on them."""
    import json

    import torch

    from dicom_node.db import init_db, make_engine
    from training import registry
    from training.retrain import retrain_once

    torch.set_num_threads(1)
    engine = make_engine(sqlite_url)
    init_db(engine)
    rows = _received(tmp_path, engine, n_patients=16)
    settings = _settings(tmp_path, sqlite_url)
    _label(tmp_path, settings, [r for r in rows if int(r[1][3:6]) < 12])  # P0..P11
    registry.register(engine, phantom_bundle, status="retired")
    registry.promote(engine, registry.list_versions(engine)[0]["version"])
    first = retrain_once(settings, engine=engine, device="cpu", quick=True)
    _label(tmp_path, settings, rows, name="more.csv")  # P0..P15
    second = retrain_once(settings, engine=engine, device="cpu", quick=True)
    assert first["status"] == second["status"] == "promoted", (first, second)
    assert second["current_version"] == first["version"]
    runs = tmp_path / "node" / "training" / "runs"
    splits = [json.loads((runs / out["version"] / "split.json").read_text()) for out in (first, second)]
    trained_on = set(splits[0]["train"]) | set(splits[0]["val"])
    assert len(trained_on) == 10 and len(set().union(*(splits[1][k] for k in ("train", "val", "test")))) == 16
    assert not set(splits[1]["test"]) & trained_on, splits
    engine.dispose()


def test_held_out_patients_never_move_to_where_an_earlier_round_trained() -> None:
    """A patient's side is fixed by its id: adding patients (30 -> 36, 200 -> 220, one at a time) never
    moves one from training or validation to the held-out side, nor from training to validation; each
    class has a patient on every side."""
    from training.datasets import Sample
    from training.sides import split_problem, stable_split

    def samples(n: int) -> list[Sample]:
        return [Sample(file=Path(f"/x/{p}.{k}.dcm"), label="covid" if p % 2 else "normal",
                       patient_id=f"local:P{p}", key=f"{p}.{k}") for p in range(n) for k in range(2)]

    rank = {"test": 0, "val": 1, "train": 2}
    for sizes in ((30, 36), (200, 220), tuple(range(6, 60))):
        splits = [stable_split(samples(n)) for n in sizes]
        for a, b in zip(splits, splits[1:], strict=False):
            before, after = a.side_of(), b.side_of()
            assert all(rank[after[p]] >= rank[side] for p, side in before.items()), sizes
            assert split_problem(b) is None
    big = stable_split(samples(2000))
    assert 0.07 < len(big.test) / 2000 < 0.13 and 0.17 < len(big.val) / 2000 < 0.23


def test_a_patient_an_earlier_round_placed_never_fills_an_emptied_held_out_side() -> None:
    """Retention deleted the files of a class's held-out patients: the next-placed patient took their place,
    though the current model had trained on it. With the kept sides only a new patient may fill the side;
    without one the round is skipped, saying what to label."""
    from training.datasets import Sample
    from training.sides import split_problem, stable_split

    def samples(ids: list[int]) -> list[Sample]:
        return [Sample(file=Path(f"/x/{p}.{k}.dcm"), label="covid" if p % 2 else "normal",
                       patient_id=f"local:P{p}", key=f"{p}.{k}") for p in ids for k in range(2)]

    first = stable_split(samples(list(range(20))))
    known = first.side_of()
    normal_held_out = {int(p.rsplit("P", 1)[1]) for p in first.test} - {p for p in range(20) if p % 2}
    assert normal_held_out
    left = [p for p in range(20) if p not in normal_held_out]  # their files went with retention
    unknown = stable_split(samples(left))  # without the kept sides: someone trained on is held out now
    assert set(unknown.test) - set(first.test) and all(known[p] != "test" for p in set(unknown.test)
                                                       - set(first.test))
    kept = stable_split(samples(left), known)
    assert all(known[p] == side for p, side in kept.side_of().items())
    assert "no normal instance on the held-out side" in (split_problem(kept) or "")
    grown = stable_split(samples([*left, 100]), known)  # a newly labelled normal patient fills it
    assert grown.side_of()["local:P100"] == "test" and split_problem(grown) is None
    assert all(known[p] == side for p, side in grown.side_of().items() if p != "local:P100")


def test_sides_of_rounds_run_before_they_were_kept_are_read_from_their_run_folders(tmp_path: Path) -> None:
    """After an upgrade, the first round found no kept sides and could hold out a patient an earlier round
    trained on; the earlier rounds' split.json files say where each patient was."""
    from training.datasets import Split, save_split
    from training.sides import read_sides, record_sides

    settings = _settings(tmp_path, "sqlite://")
    runs = tmp_path / "node" / "training" / "runs"
    save_split(Split(train=["A", "B"], val=["C"], test=["D", "E"]), runs / "0.1-r1" / "split.json")
    save_split(Split(train=["D"], val=["F"], test=["C", "G"]), runs / "0.1-r2" / "split.json")
    assert read_sides(settings) == {"A": "train", "B": "train", "C": "val", "D": "train", "E": "test",
                                    "F": "val", "G": "test"}
    record_sides(settings, Split(train=["H"], val=[], test=[]))  # from then on the kept file decides
    assert read_sides(settings)["H"] == "train" and read_sides(settings)["C"] == "val"


# --- 4, 6. what a round cannot use is left out and counted --------------------------------------------------

def _bad_jpeg(path: Path, uid: str, patient: str) -> Any:
    """A JPEG Baseline CR whose pixel data is not a JPEG: the header reads, the pixels do not decode."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    from inference.phantom import make_dicom

    make_dicom(path, shape=(288, 272), seed=5, sop_instance_uid=uid, PatientID=patient,
               transfer_syntax=JPEGBaseline8Bit, bits_stored=8)
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0garbage-not-a-jpeg" * 10])
    ds.save_as(path)
    return ds


def test_instances_a_round_cannot_use_are_left_out_and_counted(tmp_path: Path, sqlite_url: str,
                                                               phantom_bundle: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """An undecodable labelled image stopped every round; failed and ignored jobs were used; labelled
    instances whose files retention deleted vanished without a word. Now: left out, counted in the round's
    result and log, and the round goes on."""
    import torch

    from dicom_node.config import WorkerSettings
    from dicom_node.db import init_db, make_engine
    from dicom_node.queue import JobManager
    from inference.phantom import make_dicom
    from training import registry
    from training.retrain import retrain_once

    torch.set_num_threads(1)
    engine = make_engine(sqlite_url)
    init_db(engine)
    jm = JobManager(engine, WorkerSettings())
    extra = tmp_path / "extra"
    extra.mkdir()

    def enqueue(ds: Any, path: Path) -> int:
        job_id, _ = jm.enqueue(sop_instance_uid=str(ds.SOPInstanceUID),
                               study_instance_uid=str(ds.StudyInstanceUID),
                               series_instance_uid=str(ds.SeriesInstanceUID),
                               sop_class_uid=str(ds.SOPClassUID), calling_ae="PACS",
                               calling_host="127.0.0.1", spool_path=str(path))
        return job_id

    failed = "1.2.826.0.1.3680043.10.996.90.0"
    enqueue(_bad_jpeg(extra / "failed.dcm", failed, "P90"), extra / "failed.dcm")
    [claimed] = jm.claim("w1")
    jm.fail(claimed.id, "pixel data cannot be decoded", retryable=False, worker_id="w1")
    rows = _received(tmp_path, engine)
    queued_bad = "1.2.826.0.1.3680043.10.996.91.0"
    enqueue(_bad_jpeg(extra / "bad.dcm", queued_bad, "P91"), extra / "bad.dcm")
    ignored = "1.2.826.0.1.3680043.10.996.92.0"
    ds = make_dicom(extra / "ignored.dcm", shape=(288, 272), seed=7, sop_instance_uid=ignored,
                    PatientID="P92")
    jm.ignore(enqueue(ds, extra / "ignored.dcm"), "the node's own output")
    settings = _settings(tmp_path, sqlite_url)
    _label(tmp_path, settings,
           [*rows, (failed, "", "covid"), (queued_bad, "", "normal"), (ignored, "", "covid")])
    Path(tmp_path / "spool" / f"{rows[0][0]}.dcm").unlink()  # deleted by retention
    registry.register(engine, phantom_bundle, status="retired")
    registry.promote(engine, registry.list_versions(engine)[0]["version"])

    left_out = {"not_processed": 2, "file_deleted": 1, "undecodable": 1}
    caplog.set_level(logging.INFO, logger="training.retrain")
    out = retrain_once(settings, engine=engine, device="cpu", quick=True)
    assert out["status"] == "promoted" and out["labelled"] == 23 and out["left_out"] == left_out, out
    [logged] = [r for r in caplog.records if getattr(r, "action", "") == "retrain_left_out"]
    assert {k: getattr(logged, k) for k in left_out} == left_out
    assert "1 spooled file deleted (retention)" in logged.getMessage()
    row = {v["version"]: v for v in registry.list_versions(engine)}[out["version"]]
    assert row["metrics"]["left_out"] == left_out and row["metrics"]["labelled"] == 23
    # a round skipped for too few labels says what was left out
    out = retrain_once(_settings(tmp_path, sqlite_url, min_labelled=30), engine=engine, device="cpu")
    assert out == {"status": "skipped", "labelled": 23, "left_out": left_out,
                   "reason": "23 labelled local instances, 30 needed (left out: 2 job failed or ignored, 1 "
                             "spooled file deleted (retention), 1 pixels cannot be decoded)"}
    engine.dispose()


# --- 5, 7. what a round cannot do is skipped before training, saying why ------------------------------------

def test_one_class_or_too_few_patients_skip_the_round_before_training(tmp_path: Path, sqlite_url: str,
                                                                     phantom_bundle: Path) -> None:
    """With one class, or fewer than three patients of one, training ran and scikit-learn failed after it.
    Now the round is skipped with a plain reason; nothing trained, registered or left behind."""
    from training.retrain import retrain_once

    settings, engine, rows = _node(tmp_path, sqlite_url, phantom_bundle)
    versions = _versions(engine)
    _label(tmp_path, settings, [(u, a, "normal") for u, a, _ in rows], name="normal.csv")
    out = retrain_once(settings, engine=engine, device="cpu", quick=True)
    assert out["status"] == "skipped", out
    assert out["reason"] == "24 normal, 0 covid labelled instances; both classes are needed"

    few = [(u, a, lab if int(a[3:6]) < 5 else "other") for u, a, lab in rows]  # P0..P4: 3 normal, 2 covid
    _label(tmp_path, settings, few, name="few.csv")
    out = retrain_once(settings.model_copy(update={"retrain": settings.retrain.model_copy(
        update={"min_labelled": 4})}), engine=engine, device="cpu", quick=True)
    assert out["status"] == "skipped", out
    assert out["reason"] == ("2 covid patient(s) (4 instances): 3 per class are needed, one each for "
                             "training, validation and the held-out set")
    assert not (tmp_path / "node" / "training" / "runs").exists() and _versions(engine) == versions
    engine.dispose()


def test_a_pinned_model_skips_the_round(tmp_path: Path, sqlite_url: str, phantom_bundle: Path) -> None:
    """With model.path set the worker serves that bundle whatever the registry holds: a round fine-tuned the
    registry's model and reported "promoted" a model never served. Now it is skipped, saying why."""
    from training.retrain import retrain_once

    settings, engine, _ = _node(tmp_path, sqlite_url, phantom_bundle)
    versions = _versions(engine)
    pinned = settings.model_copy(update={"model": settings.model.model_copy(update={"path": phantom_bundle})})
    out = retrain_once(pinned, engine=engine, device="cpu", quick=True)
    assert out == {"status": "skipped", "reason": (
        f"model.path is set ({phantom_bundle}): the worker serves that bundle whatever the registry holds, "
        "so a retrained model would never be served; unset model.path to retrain the registry's current "
        "model")}
    assert not (tmp_path / "node" / "training" / "runs").exists() and _versions(engine) == versions
    engine.dispose()


# --- 8. `cxr-node train --data node --config FILE` ----------------------------------------------------------

def test_train_on_the_node_data_reads_the_node_config(tmp_path: Path, sqlite_url: str, phantom_bundle: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from dicom_node.cli import main
    from dicom_node.db import init_db, make_engine

    torch.set_num_threads(1)
    engine = make_engine(sqlite_url)
    init_db(engine)
    rows = _received(tmp_path, engine)
    settings = _settings(tmp_path, sqlite_url)
    _label(tmp_path, settings, rows)
    engine.dispose()
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path / "node"}"\n\n[database]\nurl = "{sqlite_url}"\n')
    monkeypatch.chdir(tmp_path)
    for name in ("CXRNODE_STORAGE_DATA_DIR", "CXRNODE_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    assert main(["train", "--data", "node", "--config", str(config), "--stage", "2", "--fine-tune",
                 "--arch", "mobilenet_v2", "--base-model", str(phantom_bundle),
                 "--out", str(tmp_path / "run"), "--quick", "--epochs", "1", "--device", "cpu"]) == 0
    assert "24 labelled instances received by the node" in capsys.readouterr().out
    assert (tmp_path / "run" / "bundle" / "model.json").is_file()


# --- 9. label files -----------------------------------------------------------------------------------------

def test_label_import_refuses_conflicts_and_says_how_many_keys_match(
        tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """One key given two labels kept the last without a word; nothing said whether the keys name anything
    received."""
    from dicom_node.cli import main
    from dicom_node.db import init_db, make_engine
    from training.retrain import label_store

    engine = make_engine(sqlite_url)
    init_db(engine)
    rows = _received(tmp_path, engine)
    engine.dispose()
    node = ["retrain", "--data-dir", str(tmp_path / "node"), "--db-url", sqlite_url, "--import-labels"]
    uid, acc = rows[0][0], rows[1][1]
    (tmp_path / "dup.csv").write_text(f"sop_instance_uid,label\n{uid},covid\n{uid},normal\n")
    assert main([*node, str(tmp_path / "dup.csv")]) == 1
    err = capsys.readouterr().err
    assert f"gives 1 key(s) two different labels: sop_instance_uid {uid} (covid and normal); nothing " \
           "imported" in err, err
    (tmp_path / "both.csv").write_text(f"sop_instance_uid,accession_number,label\n{uid},{acc},covid\n"
                                       f",{acc},normal\n")
    assert main([*node, str(tmp_path / "both.csv")]) == 1
    assert f"accession_number {acc} (covid and normal)" in capsys.readouterr().err
    assert not label_store(_settings(tmp_path, sqlite_url)).exists()

    (tmp_path / "ok.csv").write_text(f"sop_instance_uid,accession_number,label\n{uid},,covid\n{uid},,covid\n"
                                     f",{acc},normal\n1.2.3.4.5.999,,normal\n,ACC-NOT-RECEIVED,covid\n")
    assert main([*node, str(tmp_path / "ok.csv")]) == 0
    assert capsys.readouterr().out.strip() == (
        f"imported 5 labels; 4 in {label_store(_settings(tmp_path, sqlite_url))}; 2 of the file's 4 keys "
        "match received instances whose files are kept")
