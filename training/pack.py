"""Pack a compact copy of a training data set, in the same manifest format, small enough to carry.

Every image is resized so its longest side is at most ``--max-side`` (aspect kept, LANCZOS) and written as an
8-bit grayscale JPEG (quality ``--quality``); lung masks are resized with nearest neighbour and written as
1-bit PNGs. The copy's manifest has the same columns as the source manifest; ``file`` and ``mask_file``
point into the copy. Classification and segmentation rows are kept; ``dicom`` rows are dropped (original DICOM
bytes are test material, not training data). Both classes go through exactly the same conversion, so packing
adds no label-dependent artefact.

Usage::

    python -m training.pack --manifest ../shared/data/manifest.csv --out .gpudata --max-side 384

Measured on ../shared/data (953 classification + 246 segmentation rows, longest side 512): max side 384,
JPEG quality 90 gives about 20 MiB in all; PNG would be about 54 MiB.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

KEEP_TASKS = ("classification", "segmentation")


def _resized(im: Image.Image, max_side: int, resample: Image.Resampling) -> Image.Image:
    w, h = im.size
    scale = min(1.0, max_side / max(w, h))
    if scale >= 1.0:
        return im
    return im.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)


def _target_name(rel: str, suffix: str) -> str:
    return str(Path(rel).with_suffix(suffix))


def folder_size(path: Path) -> int:
    """Total bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def pack(manifest: Path, out: Path, *, max_side: int = 384, quality: int = 90) -> dict[str, int]:
    """Write the compact copy of ``manifest``'s data set into ``out``.

    Returns counts: ``rows``, ``images``, ``masks``, ``bytes`` (size of ``out`` afterwards).
    Raises ``ValueError`` for a bad argument and ``FileNotFoundError`` when the manifest or a file it lists is
    missing.
    """
    manifest = Path(manifest)
    out = Path(out)
    if not manifest.is_file():
        raise FileNotFoundError(f'Argument "manifest": {manifest} does not exist.')
    if not 32 <= int(max_side) <= 4096:
        raise ValueError('Argument "max_side" must be between 32 and 4096.')
    if not 50 <= int(quality) <= 100:
        raise ValueError('Argument "quality" must be between 50 and 100.')
    root = manifest.parent
    with manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        rows = [r for r in reader if r.get("task") in KEEP_TASKS]
    for col in ("file", "label", "task"):
        if col not in columns:
            raise ValueError(f"manifest {manifest} has no column {col!r}")
    out.mkdir(parents=True, exist_ok=True)
    done: dict[str, str] = {}
    n_img = n_mask = 0
    out_rows = []
    for row in rows:
        new = dict(row)
        src = row["file"]
        if src not in done:
            dst = _target_name(src, ".jpg")
            with Image.open(root / src) as im:
                small = _resized(im.convert("L"), max_side, Image.Resampling.LANCZOS)
            (out / dst).parent.mkdir(parents=True, exist_ok=True)
            small.save(out / dst, format="JPEG", quality=int(quality))
            done[src] = dst
            n_img += 1
        new["file"] = done[src]
        mask_src = row.get("mask_file") or ""
        if mask_src:
            dst = _target_name(mask_src, ".png")
            with Image.open(root / src) as im:
                size = _resized(im, max_side, Image.Resampling.NEAREST).size
            with Image.open(root / mask_src) as m:
                mask = m.convert("L").resize(size, Image.Resampling.NEAREST)
            mask = mask.point(lambda v: 255 if v > 127 else 0).convert("1")
            (out / dst).parent.mkdir(parents=True, exist_ok=True)
            mask.save(out / dst, format="PNG", optimize=True)
            new["mask_file"] = dst
            n_mask += 1
        out_rows.append(new)
    with (out / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(out_rows)
    total = folder_size(out)
    log.info("packed data set", extra={"action": "pack_done", "rows": len(out_rows), "bytes": total})
    return {"rows": len(out_rows), "images": n_img, "masks": n_mask, "bytes": total}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m training.pack``)."""
    p = argparse.ArgumentParser(prog="python -m training.pack", description=__doc__.splitlines()[0])
    p.add_argument("--manifest", required=True, type=Path, help="source manifest.csv")
    p.add_argument("--out", required=True, type=Path, help="folder for the compact copy (git-ignored)")
    p.add_argument("--max-side", type=int, default=384, help="longest side in pixels (default 384)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the images (default 90)")
    args = p.parse_args(argv)
    counts = pack(args.manifest, args.out, max_side=args.max_side, quality=args.quality)
    sys.stdout.write(
        f"packed {counts['rows']} rows ({counts['images']} images, {counts['masks']} masks) into {args.out}: "
        f"{counts['bytes'] / 2**20:.1f} MiB\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
