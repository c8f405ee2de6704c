"""``cxr-node predict``: run the model on DICOM, PNG and JPEG files and write a CSV (and heatmaps).

Folders are searched recursively. A file that cannot be read gets a row with finding
``not_assessable`` and reason code ``undecodable``; it never stops the run.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from dicom_node.config import Settings
from dicom_node.errors import ModelBundleError, NodeError
from inference.types import Result, XrayImage

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ".ima", ""}
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


def find_inputs(paths: list[str]) -> Iterator[Path]:
    """Files named directly, then files in folders (recursively, sorted) with an image or DICOM suffix."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                if (
                    f.is_file()
                    and not f.name.startswith(".")
                    and (f.suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES)
                ):
                    yield f
        else:
            yield path  # a missing file gets its own not_assessable row


def heatmap_name(path: Path) -> str:
    """A flat, unique-enough PNG name for ``path`` (directory separators become '__')."""
    parts = [p for p in path.as_posix().split("/") if p not in ("", ".", "..")]
    return "__".join(parts).replace(":", "_") + ".png"


def _row(file: Path, result: Result) -> dict[str, str]:
    def num(v: float | None) -> str:
        return "" if v is None else f"{v:.6f}"

    return {
        "file": str(file),
        "probability": num(result.probability),
        "finding": result.finding,
        "reason": result.reason,
        "reason_code": result.reason_code,
        "lung_attention": num(result.lung_attention),
        "lung_fraction": num(result.lung_fraction),
        "model_version": result.model_version,
    }


def _write_heatmap(out_dir: Path, file: Path, image: XrayImage, result: Result) -> None:
    from PIL import Image

    from inference.explain import overlay

    Image.fromarray(overlay(image.pixels, result.heatmap)).save(out_dir / heatmap_name(file))


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Predict every input; 0 when the CSV was written, 1 when the model cannot be loaded, 2 on bad input."""
    batch_size = args.batch_size or settings.model.batch_size
    if batch_size < 1:
        print("cxr-node predict: --batch-size must be at least 1", file=sys.stderr)
        return 2
    files = list(find_inputs(args.paths))
    if not files:
        print("cxr-node predict: no DICOM, PNG or JPEG files found", file=sys.stderr)
        return 2
    from inference.imaging import load_any
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
    heat_dir = Path(args.heatmaps) if args.heatmaps else None
    if heat_dir is not None:
        heat_dir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    try:
        with out.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for start in range(0, len(files), batch_size):
                rows: dict[int, dict[str, str]] = {}
                loaded: list[tuple[int, XrayImage]] = []
                for i, f in enumerate(files[start : start + batch_size]):
                    try:
                        loaded.append((i, load_any(f, allocate=pipeline.host_array)))
                    except Exception as exc:  # any unreadable file becomes a row, never a crash
                        log.warning(
                            "input not readable: %s",
                            exc,
                            exc_info=not isinstance(exc, NodeError | OSError | ValueError),
                            extra={"action": "predict_unreadable", "path": str(f)},
                        )
                        rows[i] = _row(
                            f,
                            Result(
                                finding="not_assessable",
                                probability=None,
                                threshold=pipeline.bundle.threshold,
                                reason=f"unreadable: {exc}",
                                reason_code="undecodable",
                                model_name=pipeline.bundle.name,
                                model_version=pipeline.bundle.version,
                            ),
                        )
                results = pipeline.run([img for _, img in loaded]) if loaded else []
                for (i, img), result in zip(loaded, results, strict=True):
                    f = files[start + i]
                    rows[i] = _row(f, result)
                    if heat_dir is not None and result.heatmap is not None:
                        _write_heatmap(heat_dir, f, img, result)
                for i in sorted(rows):
                    writer.writerow(rows[i])
                    counts[rows[i]["finding"]] = counts.get(rows[i]["finding"], 0) + 1
                fh.flush()
    finally:
        pipeline.close()
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(
        f"{len(files)} file(s) -> {out} ({summary}); model {pipeline.bundle.name} {pipeline.bundle.version}"
    )
    return 0
