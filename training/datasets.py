"""Training data: where labelled images come from, and the patient-level split.

Three inputs give the same :class:`Sample` list:

- a manifest CSV in the format of ``../shared/data/manifest.csv`` (``file, label, task, source, patient_id,
  mask_file, ...``; paths relative to the CSV's folder) — :func:`read_manifest`;
- a folder of DICOM (or PNG/JPEG) files with a labels CSV — :func:`read_labelled_folder`;
- the node's own received instances labelled by an imported CSV — ``training.local_labels``.

:func:`patient_split` splits by patient (7:2:1 by default), stratified by label and, where a stratum is large
enough, by source; a patient is never on two sides (checked every time). The split is saved as JSON in the run
folder (:func:`save_split`) so evaluation reuses exactly the same test patients.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CLASS_LABELS: tuple[str, str] = ("normal", "covid")  # index = class id; P(covid) is the model's output
SIDES: tuple[str, str, str] = ("train", "val", "test")
# The labels a manifest row may have, by task (the format of ../shared/data/manifest.csv): 'other' is a
# classification label the models are not trained on (another finding, or a COVID status left open), 'mask'
# marks a segmentation row, and a dicom row has no classification label
MANIFEST_LABELS: dict[str, frozenset[str]] = {
    "classification": frozenset({"covid", "normal", "other"}),
    "segmentation": frozenset({"mask"}),
    "dicom": frozenset({"other"}),
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass(frozen=True)
class Sample:
    """One labelled image (classification) or one image with its lung mask (segmentation)."""

    file: Path  # absolute path of the image (PNG/JPEG/DICOM)
    label: str  # covid | normal | other | mask
    patient_id: str
    source: str = "local"
    task: str = "classification"  # classification | segmentation
    mask_file: Path | None = None  # binary mask, same size as the image (segmentation rows)
    key: str = ""  # stable identifier for reports: manifest path, SOP Instance UID, ...

    @property
    def target(self) -> int:
        """Class id (0 normal, 1 covid); ``ValueError`` for any other label."""
        return CLASS_LABELS.index(self.label)


def read_manifest(path: str | Path, *, tasks: Iterable[str] = ("classification", "segmentation"),
                  labels: Iterable[str] | None = None) -> list[Sample]:
    """Read a manifest CSV; keep rows of ``tasks`` and, for classification rows, of ``labels`` (all if None).

    Raises ``FileNotFoundError`` when the manifest is missing and ``ValueError`` when a required column is
    absent, a row has no patient id, or rows have a task or a label the format does not have
    (``MANIFEST_LABELS``; every such value is named with its number of rows): a row the code does not know
    would otherwise be left out without a word.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f'Argument "path": manifest {path} does not exist.')
    tasks = set(tasks)
    keep_labels = set(labels) if labels is not None else None
    root = path.parent.resolve()
    out: list[Sample] = []
    unknown_tasks: Counter[str] = Counter()
    unknown_labels: Counter[tuple[str, str]] = Counter()
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"file", "label", "task", "patient_id"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"manifest {path} lacks column(s) {sorted(missing)}")
        for i, row in enumerate(reader, start=2):
            task = row["task"]
            if task not in MANIFEST_LABELS:
                unknown_tasks[task] += 1
                continue
            if row["label"] not in MANIFEST_LABELS[task]:
                unknown_labels[(task, row["label"])] += 1
                continue
            if task not in tasks:
                continue
            if task == "classification" and keep_labels is not None and row["label"] not in keep_labels:
                continue
            if not row["patient_id"]:
                raise ValueError(f"manifest {path} line {i}: empty patient_id")
            mask = row.get("mask_file") or ""
            out.append(Sample(file=root / row["file"], label=row["label"], patient_id=row["patient_id"],
                              source=row.get("source") or "unknown", task=task,
                              mask_file=(root / mask) if mask else None, key=row["file"]))
    _refuse_unknown(path, unknown_tasks, unknown_labels)
    log.info("manifest read", extra={"action": "manifest_read", "rows": len(out)})
    return out


def _refuse_unknown(path: Path, tasks: Counter[str], labels: Counter[tuple[str, str]]) -> None:
    """``ValueError`` naming every task and label of ``path`` that the manifest format does not have."""
    problems = []
    if tasks:
        found = ", ".join(f"{t!r} ({n} row{'s' * (n != 1)})" for t, n in sorted(tasks.items()))
        problems.append(f"unknown task(s) {found}; a task is {', '.join(MANIFEST_LABELS)}")
    if labels:
        found = ", ".join(f"{label!r} ({n} {task} row{'s' * (n != 1)})" for (task, label), n in
                          sorted(labels.items()))
        allowed = "; ".join(f"{task} rows {' or '.join(sorted(ls))}" for task, ls in MANIFEST_LABELS.items())
        problems.append(f"unknown label(s) {found}; labels are: {allowed}")
    if problems:
        raise ValueError(f"manifest {path}: {'. '.join(problems)}")


def read_labelled_folder(folder: str | Path, labels_csv: str | Path, *,
                         source: str = "local") -> list[Sample]:
    """Images under ``folder`` labelled by ``labels_csv``.

    The CSV has a ``label`` column and either ``file`` (path relative to ``folder``) or ``sop_instance_uid``
    (matched against the DICOM headers under ``folder``); optional ``patient_id`` and ``source`` columns.
    Without ``patient_id`` the DICOM PatientID is used (else the file name).
    Rows whose file is missing raise ``FileNotFoundError``; unmatched UIDs raise ``ValueError`` naming them.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'Argument "folder": {folder} is not a directory.')
    rows = _read_label_rows(labels_csv)
    by_uid: dict[str, tuple[Path, str]] = {}
    if any(not r.get("file") for r in rows):
        by_uid = _index_dicom_folder(folder)
    out = []
    unmatched = []
    for r in rows:
        if r.get("file"):
            p = (folder / r["file"]).resolve()
            if not p.is_file():
                raise FileNotFoundError(f"labels CSV {labels_csv}: file {r['file']} not under {folder}")
            pid = r.get("patient_id") or _dicom_patient_id(p) or p.name
            key = r["file"]
        else:
            uid = r.get("sop_instance_uid", "")
            if uid not in by_uid:
                unmatched.append(uid)
                continue
            p, header_pid = by_uid[uid]
            pid = r.get("patient_id") or header_pid or uid
            key = uid
        out.append(Sample(file=p, label=r["label"], patient_id=pid, source=r.get("source") or source,
                          key=key))
    if unmatched:
        raise ValueError(f"labels CSV {labels_csv}: {len(unmatched)} SOP Instance UID(s) not found under "
                         f"{folder}, e.g. {unmatched[:3]}")
    return out


def _read_label_rows(labels_csv: str | Path) -> list[dict[str, str]]:
    """Rows of a labels CSV (keys lower-cased); ``ValueError`` when the label column or a key is missing.

    The file is read as UTF-8; a byte-order mark (spreadsheet programs write one) is dropped.
    """
    labels_csv = Path(labels_csv)
    if not labels_csv.is_file():
        raise FileNotFoundError(f'Argument "labels_csv": {labels_csv} does not exist.')
    try:
        with labels_csv.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip().lower() for f in reader.fieldnames or []]
            if "label" not in fields:
                raise ValueError(f"labels CSV {labels_csv} has no 'label' column")
            rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    except UnicodeDecodeError as exc:
        raise ValueError(f"labels CSV {labels_csv} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                         "save it as CSV UTF-8") from None
    for i, r in enumerate(rows, start=2):
        if not (r.get("file") or r.get("sop_instance_uid") or r.get("accession_number")):
            raise ValueError(f"labels CSV {labels_csv} line {i}: needs file, sop_instance_uid or "
                             "accession_number")
        if r["label"] not in ("covid", "normal", "other"):
            raise ValueError(f"labels CSV {labels_csv} line {i}: label {r['label']!r} is not covid, normal "
                             "or other")
    return rows


def _dicom_header(path: Path) -> dict[str, str] | None:
    """SOPInstanceUID, PatientID and AccessionNumber of a DICOM file; None for a non-DICOM file."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return None
    import pydicom  # lazy: the GPU training environment may not have it
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SOPInstanceUID", "PatientID", "AccessionNumber"])
    except (InvalidDicomError, OSError):
        return None
    return {"sop_instance_uid": str(ds.get("SOPInstanceUID", "")), "patient_id": str(ds.get("PatientID", "")),
            "accession_number": str(ds.get("AccessionNumber", ""))}


def _dicom_patient_id(path: Path) -> str:
    head = _dicom_header(path)
    return head["patient_id"] if head else ""


def _index_dicom_folder(folder: Path) -> dict[str, tuple[Path, str]]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            head = _dicom_header(p)
            if head and head["sop_instance_uid"]:
                out[head["sop_instance_uid"]] = (p.resolve(), head["patient_id"])
    return out


# ----------------------------------------------------------------------------------------------- the split


@dataclass
class Split:
    """Patient ids per side, with what produced them."""

    train: list[str]
    val: list[str]
    test: list[str]
    seed: int = 0
    ratios: tuple[float, float, float] = (0.7, 0.2, 0.1)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # side -> label -> images

    def side_of(self) -> dict[str, str]:
        """patient id -> side; raises ``AssertionError`` when a patient is on two sides."""
        out: dict[str, str] = {}
        for side in SIDES:
            for pid in getattr(self, side):
                assert pid not in out, f"patient {pid!r} is on two sides ({out[pid]} and {side})"
                out[pid] = side
        return out

    def select(self, samples: Sequence[Sample], side: str) -> list[Sample]:
        """The samples whose patient is on ``side``."""
        if side not in SIDES:
            raise ValueError(f'Argument "side" must be one of {SIDES}.')
        sides = self.side_of()
        return [s for s in samples if sides.get(s.patient_id) == side]


def patient_split(samples: Sequence[Sample], *, ratios: Sequence[float] = (0.7, 0.2, 0.1), seed: int = 0,
                  min_stratum: int = 10) -> Split:
    """Split patients into train/val/test with the given ratios, stratified by (label, source).

    A patient's label is the majority label of its classification rows (``mask`` when it has only masks), its
    source the most common one. Strata with fewer than ``min_stratum`` patients are pooled per label. Within a
    stratum, patients are shuffled with ``seed`` and cut at the cumulative ratios.
    Same input + seed -> same split. When ``samples`` hold covid or normal images, ``ValueError`` unless each
    side with a share holds both (:func:`require_both_classes`): a model is neither trained nor measured on
    one class.
    """
    ratios = tuple(float(r) for r in ratios)
    if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1.0) > 1e-6:
        raise ValueError('Argument "ratios" must be three non-negative numbers summing to 1.')
    if not samples:
        raise ValueError('Argument "samples" is empty.')
    labels: dict[str, Counter[str]] = defaultdict(Counter)
    sources: dict[str, Counter[str]] = defaultdict(Counter)
    for s in samples:
        labels[s.patient_id][s.label if s.task == "classification" else "mask"] += (
            2 if s.task == "classification" else 1)
        sources[s.patient_id][s.source] += 1
    strata: dict[tuple[str, str], list[str]] = defaultdict(list)
    for pid in sorted(labels):
        strata[(labels[pid].most_common(1)[0][0], sources[pid].most_common(1)[0][0])].append(pid)
    pooled: dict[tuple[str, str], list[str]] = defaultdict(list)
    for (label, source), pids in strata.items():
        pooled[(label, source) if len(pids) >= min_stratum else (label, "*")].extend(pids)
    rng = random.Random(seed)
    sides: dict[str, list[str]] = {s: [] for s in SIDES}
    for key in sorted(pooled):
        pids = sorted(pooled[key])
        rng.shuffle(pids)
        n = len(pids)
        cut1 = round(n * ratios[0])
        cut2 = round(n * (ratios[0] + ratios[1]))
        if n >= 3 and ratios[2] > 0 and cut2 == n:  # keep at least one test patient per stratum of 3+
            cut2 = n - 1
        if n >= 3 and ratios[1] > 0 and cut2 == cut1:
            cut1 -= 1
        sides["train"] += pids[:cut1]
        sides["val"] += pids[cut1:cut2]
        sides["test"] += pids[cut2:]
    split = Split(train=sorted(sides["train"]), val=sorted(sides["val"]), test=sorted(sides["test"]),
                  seed=seed, ratios=ratios)  # type: ignore[arg-type]
    split.side_of()  # asserts disjointness
    for side in SIDES:
        split.counts[side] = dict(Counter(s.label for s in split.select(samples, side)))
    log.info("patient split", extra={"action": "split", "counts": split.counts})
    if any(s.task == "classification" and s.label in CLASS_LABELS for s in samples):
        require_both_classes(split, samples, [side for side, r in zip(SIDES, ratios, strict=True) if r > 0],
                             hint="label more patients of the missing class (with at least 3 patients a "
                                  "class is on every side)")
    return split


def require_both_classes(split: Split, samples: Sequence[Sample], sides: Iterable[str] = SIDES, *,
                         name: str = "the patient split", hint: str = "") -> None:
    """``ValueError``, in plain words, unless each of ``sides`` holds classification images of both classes
    (``CLASS_LABELS``): with one class no model can be trained, no threshold set and no ROC AUC measured.
    ``name`` says which split it is in the message, ``hint`` what to do about it."""
    cls = [s for s in samples if s.task == "classification" and s.label in CLASS_LABELS]
    total = Counter(s.label for s in cls)
    absent = [label for label in CLASS_LABELS if not total[label]]
    if absent:
        have = ", ".join(f"{n} {label}" for label, n in sorted(total.items())) or "none"
        raise ValueError(f"the data has no {' and no '.join(absent)} image (classification images labelled "
                         f"covid or normal: {have}); both classes, covid and normal, are needed")
    problems, per_side = [], []
    for side in sides:
        have_side = Counter(s.label for s in split.select(cls, side))
        per_side.append(f"{side} " + (", ".join(f"{have_side[label]} {label}" for label in CLASS_LABELS)))
        missing = [label for label in CLASS_LABELS if not have_side[label]]
        if missing:
            problems.append(f"{side} has no {' and no '.join(missing)} image")
    if problems:
        raise ValueError(f"{name} lacks a class: {'; '.join(problems)} (images: {'; '.join(per_side)}); "
                         f"both classes, covid and normal, are needed{': ' + hint if hint else ''}")


def save_split(split: Split, path: str | Path) -> Path:
    """Write the split as JSON (patient ids per side, seed, ratios, counts)."""
    split.side_of()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(split), indent=1))
    return path


def load_split(path: str | Path) -> Split:
    """Read a split written by :func:`save_split`; ``AssertionError`` if it puts a patient on two sides."""
    data = json.loads(Path(path).read_text())
    split = Split(train=list(data["train"]), val=list(data["val"]), test=list(data["test"]),
                  seed=int(data.get("seed", 0)), ratios=tuple(data.get("ratios", (0.7, 0.2, 0.1))),
                  counts=data.get("counts", {}))
    split.side_of()
    return split


def load_data(data: str | Path, labels: str | Path | None = None) -> list[Sample]:
    """Samples from ``--data``: a manifest CSV, a folder with ``manifest.csv``, or a folder + ``labels``."""
    data = Path(data)
    if labels is not None:
        return read_labelled_folder(data, labels)
    if data.is_file() or (data / "manifest.csv").is_file():
        return read_manifest(data)
    raise FileNotFoundError(f"{data}: neither a manifest CSV nor a folder with manifest.csv (give --labels "
                            "CSV for a folder of DICOM files)")
