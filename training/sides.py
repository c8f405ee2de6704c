"""Local retraining's patient sides and its lock.

Each patient's side (training, validation, held-out; 7:2:1) comes from a hash of its id and is kept for good
in ``<data_dir>/training/sides.json``, so the held-out set never holds a patient an earlier round trained or
validated the current model on. One round at a time holds the retraining lock (per data folder, and per
database on PostgreSQL); retention takes it too, so it never deletes the files a round is reading.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import socket
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from training.datasets import CLASS_LABELS, SIDES, Sample, Split

# Where a patient's hash position in [0, 1) puts it: held out below 0.1, validation below 0.3 (7:2:1).
HELD_OUT_BELOW, VALIDATION_BELOW = 0.1, 0.3
SIDE_NAMES = {"train": "training", "val": "validation", "test": "held-out"}
# Key of the PostgreSQL advisory lock a retraining round holds on a connection of its own.
_ROUND_LOCK_KEY = 0x6378726E72746E  # "cxrnrtn"


def position(patient_id: str) -> float:
    """A patient's fixed place in [0, 1), from the SHA-256 of its id: the same in every round."""
    return int.from_bytes(hashlib.sha256(patient_id.encode()).digest()[:8], "big") / 2.0 ** 64


def patient_labels(samples: Sequence[Sample]) -> dict[str, str]:
    """Each patient's label: the majority of its instances' (covid on a tie)."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for s in samples:
        counts[s.patient_id][s.label] += 1
    return {pid: max(c, key=lambda label: (c[label], label == "covid")) for pid, c in counts.items()}


def sides_file(settings: Any) -> Path:
    """Where the sides patients were given in earlier rounds are kept (patient id -> train/val/test)."""
    return Path(settings.storage.data_dir) / "training" / "sides.json"


def read_sides(settings: Any) -> dict[str, str]:
    """The sides earlier rounds gave patients; empty before the first round. Without the file (rounds of a
    release that did not keep it), from the ``split.json`` of every earlier round's run folder: a patient on
    training or validation in any of them counts as trained on (never held out)."""
    path = sides_file(settings)
    if path.is_file():
        return dict(json.loads(path.read_text(encoding="utf-8")))
    rank = {"test": 0, "val": 1, "train": 2}
    sides: dict[str, str] = {}
    for split_json in sorted((path.parent / "runs").glob("*/split.json")):
        try:
            earlier = json.loads(split_json.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for side in SIDES:
            for pid in earlier.get(side, []) if isinstance(earlier, dict) else []:
                if pid not in sides or rank[side] > rank[sides[pid]]:
                    sides[pid] = side
    return sides


def record_sides(settings: Any, split: Split) -> None:
    """Add this round's patients to the kept sides (written whole, then renamed into place)."""
    path = sides_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    sides = {**read_sides(settings), **split.side_of()}
    staging = path.with_name(path.name + ".part")
    staging.write_text(json.dumps(sides, indent=0, sort_keys=True), encoding="utf-8")
    staging.replace(path)


def stable_split(samples: Sequence[Sample], known: dict[str, str] | None = None) -> Split:
    """Patients on train/val/test (7:2:1) by their :func:`position`, per class, so that adding patients never
    moves one already there towards the held-out side: the held-out set never holds a patient an earlier
    round trained or validated the current model on.

    ``known``: the sides earlier rounds gave (:func:`read_sides`); such a patient keeps its side for good. A
    class with no patient on the held-out side gets its lowest-placed new patient there, and one with none on
    validation its lowest-placed new patient left on training: never one an earlier round placed, so a
    patient whose files retention deleted is not replaced by one the current model trained on (the side then
    stays empty and :func:`split_problem` skips the round).
    """
    known = known or {}
    sides: dict[str, str] = {}
    by_label: dict[str, list[str]] = defaultdict(list)
    for pid, label in patient_labels(samples).items():
        by_label[label].append(pid)
    for pids in by_label.values():
        pids.sort(key=lambda p: (position(p), p))
        for pid in pids:
            at = position(pid)
            sides[pid] = known.get(pid) or ("test" if at < HELD_OUT_BELOW
                                            else "val" if at < VALIDATION_BELOW else "train")
        new = [p for p in pids if p not in known]
        if "test" not in {sides[p] for p in pids} and new:
            sides[new[0]] = "test"
        if "val" not in {sides[p] for p in pids}:
            rest = [p for p in new if sides[p] == "train"]
            if rest:
                sides[rest[0]] = "val"
    on = {side: sorted(p for p, at in sides.items() if at == side) for side in SIDES}
    split = Split(train=on["train"], val=on["val"], test=on["test"])
    for side in SIDES:
        split.counts[side] = dict(Counter(s.label for s in split.select(samples, side)))
    return split


def class_problem(samples: Sequence[Sample]) -> str | None:
    """Why ``samples`` cannot give a training, validation and held-out side with both classes; None if they
    can (then :func:`split_problem` checks the split)."""
    instances = Counter(s.label for s in samples)
    patients = Counter(patient_labels(samples).values())
    if not all(instances[label] for label in CLASS_LABELS):
        have = ", ".join(f"{instances[label]} {label}" for label in CLASS_LABELS)
        return f"{have} labelled instances; both classes are needed"
    for label in CLASS_LABELS:
        if patients[label] < 3:
            return (f"{patients[label]} {label} patient(s) ({instances[label]} instances): 3 per class are "
                    "needed, one each for training, validation and the held-out set")
    return None


def split_problem(split: Split) -> str | None:
    """Which side of ``split`` lacks a class; None when every side has both."""
    for side in SIDES:
        for label in CLASS_LABELS:
            if not split.counts[side].get(label):
                per_side = ", ".join(f"{SIDE_NAMES[k]} {split.counts[k].get(label, 0)}" for k in SIDES)
                return (f"no {label} instance on the {SIDE_NAMES[side]} side ({label} instances per side: "
                        f"{per_side}); label more {label} patients")
    return None


class RoundBusy(RuntimeError):
    """Another retraining round holds the retraining lock."""


@contextmanager
def round_lock(settings: Any, engine: Any, holder: str = "retraining round") -> Iterator[None]:
    """Hold the retraining lock for one round (or, ``holder`` ``"retention run"``, for a retention run, which
    must not delete the files a round is reading); :class:`RoundBusy` (naming the holder) when it is held.

    Two locks, each released by the system when its holder dies, so a crashed round never blocks later ones:
    an exclusive ``flock`` on ``<data_dir>/training/retrain.lock`` (rounds of any process writing into this
    data folder), and on PostgreSQL a session advisory lock on a connection of its own (rounds of any machine
    on this database).
    """
    path = Path(settings.storage.data_dir) / "training" / "retrain.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            held = fh.read().strip() or "another process"
            raise RoundBusy(f"the retraining lock is held ({held}; lock {path})") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{holder}: pid {os.getpid()} on {socket.gethostname()} since "
                 f"{dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}\n")
        fh.flush()
        if engine.dialect.name != "postgresql":
            yield
            return
        from sqlalchemy import text

        conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            if not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _ROUND_LOCK_KEY}).scalar():
                raise RoundBusy("a retraining round or retention run holds the lock on database "
                                f"{engine.url.render_as_string(hide_password=True)}")
            yield
        finally:
            conn.invalidate()  # the connection is closed, not pooled: its session's lock ends with it
            conn.close()
