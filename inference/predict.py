"""``cxr-node predict``: run the model on DICOM, PNG and JPEG files and write a CSV (and heatmaps).

Folders are searched recursively, following links to folders (each folder once), and every file in them is
tried: the content tells DICOM from PNG or JPEG, not the name (a storescp or PACS export names its files by
UID). Every file gets one row, whatever happens to it: a file that cannot be read gets finding
``not_assessable`` with reason code ``undecodable``, one whose processing fails (out of memory, say) reason
code ``error``, with the reason; it never stops the run. Hidden entries (names starting with '.'), folders
that cannot be listed, folders reached a second time through a link, and this run's own CSV and heatmap
folder are left out, and what was left out is counted at the end.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.config import Settings
from dicom_node.errors import ModelBundleError, NodeError
from inference.types import Result, XrayImage

if TYPE_CHECKING:
    from inference.pipeline import Pipeline

log = logging.getLogger(__name__)

CSV_COLUMNS = [
    "file",
    "probability",
    "finding",
    "reason",
    "reason_code",
    "lung_attention",
    "lung_fraction",
    "model_version",
]
# the readable part of a heatmap's name, in UTF-8 bytes: with the hash and '.png', far below the 255 bytes a
# file name may have
HEATMAP_TAIL_BYTES = 100


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cxr-node predict``."""
    p.add_argument("--config", metavar="FILE", help="TOML configuration file (model settings)")
    p.add_argument("--model", metavar="DIR", help="model bundle directory (default: the shipped model)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="model.device")
    p.add_argument("--cam", choices=["gradcam", "gradcam++"], help="explanation method (default: model.cam)")
    p.add_argument("--heatmaps", metavar="DIR", help="write a heatmap overlay PNG per assessed image here")
    p.add_argument("--batch-size", type=int, metavar="N", help="images per batch (default: model.batch_size)")
    p.add_argument("--out", required=True, metavar="CSV", help="output CSV file")
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM/PNG/JPEG files or folders (recursive)")


def printable(text: str) -> str:
    """``text`` as UTF-8 can hold it: bytes of a file name that are not UTF-8 (which Python keeps as lone
    surrogates, e.g. a Latin-1 'ü') become ``\\xNN`` escapes, so a CSV or a log line can carry the name."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


@dataclass
class Inputs:
    """The files to try, in order, and what the search left out (one line per kind, with a count)."""

    files: list[Path] = field(default_factory=list)
    left_out: dict[str, list[str]] = field(default_factory=dict)

    def leave_out(self, kind: str, path: Path | str, why: str = "", *, level: int = logging.WARNING) -> None:
        """Record ``path`` as left out for ``kind`` (and log it, naming the path)."""
        name = printable(str(path))
        self.left_out.setdefault(kind, []).append(f"{name}: {why}" if why else name)
        log.log(level, "%s left out: %s%s", name, kind, f" ({why})" if why else "",
                extra={"action": "predict_left_out", "path": name})

    def summary(self) -> str:
        """'2 hidden entries (a/.x, b/.y), ...': every kind with its count and the first few paths."""
        parts = []
        for kind, paths in self.left_out.items():
            shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
            parts.append(f"{len(paths)} {kind} ({shown})")
        return "; ".join(parts)


def _identity(path: Path | str) -> tuple[int, int] | None:
    """(device, inode) of ``path`` (links followed); None when it cannot be reached."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def find_inputs(paths: Iterable[str | Path], *, exclude: Iterable[Path] = ()) -> Inputs:
    """Files named directly (a missing one too: it gets its own row), then every file in the folders given.

    Folders are walked recursively in name order, links to folders followed, each folder once (a link loop
    or a second link to a folder already walked is left out, and said so). ``exclude`` (this run's CSV and
    heatmap folder) is never read as input. Hidden entries and folders that cannot be listed are left out
    and recorded in the result's ``left_out``; everything else, whatever its name or type, is tried.
    """
    found = Inputs()
    exclude = list(exclude)
    excluded = {ident for p in exclude if (ident := _identity(p)) is not None}
    excluded_names = {p.name for p in exclude}
    for raw in paths:
        top = Path(raw)
        if not top.is_dir():
            found.files.append(top)
            continue
        seen = {_identity(top)}
        walked: list[Path] = []

        def unlisted(exc: OSError) -> None:
            found.leave_out("folder(s) that cannot be listed", exc.filename or "?", exc.strerror or str(exc))

        for root, dirs, names in os.walk(top, followlinks=True, onerror=unlisted):
            keep = []
            for d in sorted(dirs):
                path = Path(root, d)
                ident = _identity(path)
                if d.startswith("."):
                    found.leave_out("hidden entries", path, level=logging.INFO)
                elif ident in excluded:
                    continue  # this run's heatmap folder
                elif ident is not None and ident in seen:
                    found.leave_out("folder(s) searched already, reached again through a link", path)
                else:
                    seen.add(ident)
                    keep.append(d)
            dirs[:] = keep
            for name in sorted(names):
                path = Path(root, name)
                if name.startswith("."):
                    found.leave_out("hidden entries", path, level=logging.INFO)
                elif name in excluded_names and _identity(path) in excluded:
                    continue  # this run's CSV
                else:
                    walked.append(path)
        found.files += sorted(walked)
    return found


def heatmap_name(path: Path) -> str:
    """A short PNG name for ``path``'s heatmap, unique to the path: the end of the path, flattened and cut
    to HEATMAP_TAIL_BYTES bytes, and a hash of the whole path (``a/x.png`` and ``a__x.png`` differ)."""
    digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:12]
    parts = [p for p in path.as_posix().split("/") if p not in ("", ".", "..")]
    flat = "".join(c if c.isalnum() or c in "-_." else "_" for c in "__".join(parts))
    kept: list[str] = []
    used = 0
    for c in reversed(flat):
        used += len(c.encode("utf-8"))
        if used > HEATMAP_TAIL_BYTES:
            break
        kept.append(c)
    tail = "".join(reversed(kept))
    if len(tail) < len(flat) and "__" in tail:  # cut: start at a folder's name
        tail = tail.split("__", 1)[1]
    return tail.lstrip("._") + f"-{digest}.png"


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.6f}"


def _row(file: Path, result: Result) -> dict[str, str]:
    return {
        "file": printable(str(file)),
        "probability": _num(result.probability),
        "finding": result.finding,
        "reason": printable(result.reason),
        "reason_code": result.reason_code,
        "lung_attention": _num(result.lung_attention),
        "lung_fraction": _num(result.lung_fraction),
        "model_version": result.model_version,
    }


def _write_heatmap(out_dir: Path, file: Path, image: XrayImage, result: Result) -> None:
    from PIL import Image

    from inference.explain import overlay

    Image.fromarray(overlay(image.pixels, result.heatmap)).save(out_dir / heatmap_name(file))


class _Predictor:
    """One row per file, batch by batch; a failure costs its own file's row only."""

    def __init__(self, pipeline: Pipeline, heat_dir: Path | None) -> None:
        self.pipeline = pipeline
        self.heat_dir = heat_dir
        self.heatmaps_failed: list[str] = []

    def _failed(self, file: Path, code: str, what: str, exc: BaseException) -> dict[str, str]:
        detail = printable(" ".join(str(exc).split()))
        if code != "undecodable" or not detail:  # a MemoryError says nothing but its type
            detail = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        name = printable(str(file))
        expected = isinstance(exc, NodeError | OSError | ValueError | MemoryError)
        said = detail if name in detail else f"{name}: {detail}"
        log.warning("%s: %s", what, said, exc_info=not expected,
                    extra={"action": "predict_unreadable" if code == "undecodable" else "predict_failed",
                           "path": name})
        bundle = self.pipeline.bundle
        text = f"unreadable: {detail}" if code == "undecodable" else f"{what}: {detail}"
        return _row(file, Result(finding="not_assessable", probability=None, threshold=bundle.threshold,
                                 reason=text, reason_code=code, model_name=bundle.name,
                                 model_version=bundle.version))

    def batch(self, files: list[Path]) -> list[dict[str, str]]:
        """One row per file of ``files``, in their order; heatmaps written for the assessed ones."""
        from inference.imaging import load_any
        from inference.pipeline import run_isolated

        rows: dict[int, dict[str, str]] = {}
        loaded: list[tuple[int, XrayImage]] = []
        for i, f in enumerate(files):
            try:
                loaded.append((i, load_any(f, allocate=self.pipeline.host_array)))
            except Exception as exc:  # any unreadable file becomes a row, never a crash
                rows[i] = self._failed(f, "undecodable", "not readable", exc)
        results = run_isolated(self.pipeline, [img for _, img in loaded])
        for (i, img), result in zip(loaded, results, strict=True):
            f = files[i]
            if isinstance(result, Exception):
                rows[i] = self._failed(f, "error", "processing failed", result)
                continue
            try:
                rows[i] = _row(f, result)
                if self.heat_dir is not None and result.heatmap is not None:
                    _write_heatmap(self.heat_dir, f, img, result)
            except Exception as exc:  # the heatmap (made on first access) or its file: the row stays
                name = printable(str(f))
                self.heatmaps_failed.append(name)
                log.warning("%s: heatmap not written: %s", name, printable(str(exc)),
                            exc_info=not isinstance(exc, OSError),
                            extra={"action": "predict_heatmap_failed", "path": name})
                if i not in rows:
                    rows[i] = self._failed(f, "error", "processing failed", exc)
        return [rows[i] for i in range(len(files))]


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Predict every input; 0 when the CSV was written, 1 when the model cannot be loaded, 2 on bad input."""
    if args.batch_size is not None and args.batch_size < 1:
        print(f"cxr-node predict: --batch-size must be at least 1, got {args.batch_size}", file=sys.stderr)
        return 2
    batch_size = args.batch_size if args.batch_size is not None else settings.model.batch_size
    out = Path(args.out)
    heat_dir = Path(args.heatmaps) if args.heatmaps else None
    inputs = find_inputs(args.paths, exclude=[out] + ([heat_dir] if heat_dir is not None else []))
    files = inputs.files
    if not files:
        left = f"; left out: {inputs.summary()}" if inputs.left_out else ""
        print(f"cxr-node predict: no files found in {' '.join(map(printable, args.paths))}{left}",
              file=sys.stderr)
        return 2
    from inference.pipeline import Pipeline

    try:
        pipeline = Pipeline.from_bundle(
            settings.model.path,
            device=settings.model.device,
            cam=args.cam or settings.model.cam,
            cpu_threads=settings.model.cpu_threads,
        )
    except (ModelBundleError, ValueError) as exc:
        print(f"cxr-node predict: {exc}", file=sys.stderr)
        return 1
    if heat_dir is not None:
        heat_dir.mkdir(parents=True, exist_ok=True)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    predictor = _Predictor(pipeline, heat_dir)
    counts: dict[str, int] = {}
    try:
        with out.open("w", newline="", encoding="utf-8", errors="backslashreplace") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for start in range(0, len(files), batch_size):
                for row in predictor.batch(files[start : start + batch_size]):
                    writer.writerow(row)
                    counts[row["finding"]] = counts.get(row["finding"], 0) + 1
                fh.flush()
    finally:
        pipeline.close()
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(
        f"{len(files)} file(s) -> {printable(str(out))} ({summary}); "
        f"model {pipeline.bundle.name} {pipeline.bundle.version}"
    )
    if predictor.heatmaps_failed:
        print(f"cxr-node predict: {len(predictor.heatmaps_failed)} heatmap(s) not written (see the log): "
              f"{', '.join(predictor.heatmaps_failed[:3])}", file=sys.stderr)
    if inputs.left_out:
        print(f"cxr-node predict: left out: {inputs.summary()}", file=sys.stderr)
    return 0
