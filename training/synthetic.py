"""A small synthetic data set in the manifest format, drawn with ``inference.phantom``: for tests and demos.

``covid`` images carry opacities, ``normal`` ones do not; every image also has a lung-mask row. Image shapes
are drawn independently of the label, so shape alone tells nothing here.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

COLUMNS = ["file", "label", "task", "source", "patient_id", "view", "sex", "age", "license", "origin",
           "mask_file"]


def make_phantom_dataset(out: str | Path, *, patients: int = 20, images_per_patient: int = 2, size: int = 96,
                         sources: tuple[str, ...] = ("synth_a", "synth_b"), seed: int = 0) -> Path:
    """Write PNG images, PNG masks and ``manifest.csv`` under ``out``; returns the manifest path.

    Patient ``i`` is ``covid`` when ``i`` is odd, ``normal`` otherwise; its source alternates over ``sources``
    every two patients so both labels occur in every source.
    """
    from inference.phantom import make_phantom

    if patients < 2 or images_per_patient < 1:
        raise ValueError('Arguments "patients" (>= 2) and "images_per_patient" (>= 1) are too small.')
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        label = "covid" if p % 2 else "normal"
        source = sources[(p // 2) % len(sources)]
        for k in range(images_per_patient):
            shape = (int(size * rng.uniform(0.85, 1.15)), int(size * rng.uniform(0.85, 1.15)))
            img, mask = make_phantom(shape, opacity=float(rng.uniform(0.5, 0.9)) if label == "covid" else 0.0,
                                     seed=seed * 10_000 + p * 100 + k)
            name = f"p{p:03d}_{k}"
            Image.fromarray(np.rint(img * 255).astype(np.uint8)).save(out / "images" / f"{name}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / f"{name}_mask.png")
            common = {"source": source, "patient_id": f"{source}:{p}", "view": "PA", "sex": "", "age": "",
                      "license": "synthetic", "origin": "inference.phantom"}
            rows.append({"file": f"images/{name}.png", "label": label, "task": "classification",
                         "mask_file": "", **common})
            rows.append({"file": f"images/{name}.png", "label": "mask", "task": "segmentation",
                         "mask_file": f"masks/{name}_mask.png", **common})
    return write_manifest(out, rows)


def write_manifest(out: str | Path, rows: list[dict[str, str]]) -> Path:
    """Write ``rows`` (the manifest's columns) as ``out/manifest.csv``; returns its path."""
    path = Path(out) / "manifest.csv"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path
