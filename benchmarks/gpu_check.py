"""Check that the CUDA pipeline gives the CPU pipeline's results (a command for a GPU machine, not a test).

    python benchmarks/gpu_check.py [--model DIR] [--images DIR] [--limit N]

Runs the same images (synthetic phantoms as DICOM, plus up to ``--limit`` PNG/JPEG/DICOM files from
``--images``) through :class:`inference.pipeline.Pipeline` on the CPU and on CUDA (bf16 autocast there) and
compares per image: finding, probability, lung mask IoU, heatmap correlation and lung attention. Prints one
row per image and exits 1 when any image disagrees beyond the tolerances below.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from inference import gpu_preprocess as gp
from inference.imaging import load_any, load_dicom
from inference.phantom import make_dicom
from inference.pipeline import Pipeline
from inference.types import Result, XrayImage

TOL_PROBABILITY = 0.03  # bf16 autocast on the GPU vs fp32 on the CPU
MIN_MASK_IOU = 0.97
MIN_HEAT_CORR = 0.95
TOL_ATTENTION = 0.05


def _iou(a: np.ndarray | None, b: np.ndarray | None) -> float:
    if a is None or b is None:
        return float("nan") if (a is None) != (b is None) else 1.0
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _corr(a: np.ndarray | None, b: np.ndarray | None) -> float:
    if a is None or b is None:
        return float("nan") if (a is None) != (b is None) else 1.0
    if a.std() == 0 or b.std() == 0:
        return 1.0 if np.allclose(a, b, atol=1e-3) else 0.0
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def compare(cpu: Result, gpu: Result) -> tuple[bool, str]:
    """Whether two results of one image agree, and a one-line description."""
    if cpu.finding == "not_assessable" or gpu.finding == "not_assessable":
        same = cpu.finding == gpu.finding and cpu.reason_code == gpu.reason_code
        return same, f"{cpu.finding}/{cpu.reason_code} vs {gpu.finding}/{gpu.reason_code}"
    assert cpu.probability is not None and gpu.probability is not None
    dp = abs(cpu.probability - gpu.probability)
    iou, corr = _iou(cpu.lung_mask, gpu.lung_mask), _corr(cpu.heatmap, gpu.heatmap)
    da = abs((cpu.lung_attention or 0.0) - (gpu.lung_attention or 0.0))
    near_threshold = min(abs(cpu.probability - cpu.threshold), abs(gpu.probability - gpu.threshold)) < dp
    ok = (dp <= TOL_PROBABILITY and iou >= MIN_MASK_IOU and corr >= MIN_HEAT_CORR and da <= TOL_ATTENTION
          and (cpu.finding == gpu.finding or near_threshold))
    return ok, (f"p {cpu.probability:.4f}/{gpu.probability:.4f}  mask IoU {iou:.3f}  heat r {corr:.3f}  "
                f"attention {cpu.lung_attention or 0:.3f}/{gpu.lung_attention or 0:.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="model bundle (default: the shipped model)")
    p.add_argument("--images", type=Path, help="folder of PNG/JPEG/DICOM files to add (recursive)")
    p.add_argument("--limit", type=int, default=24)
    p.add_argument("--other", default="cuda", choices=["cuda", "cpu"], help="device compared with the CPU")
    args = p.parse_args(argv)
    if args.other == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to compare", file=sys.stderr)
        return 2
    other = Pipeline.from_bundle(args.model, device=args.other)
    # DICOM images are decoded as the node decodes them for this device (into page-locked memory on CUDA)
    images: list[XrayImage] = []
    phantoms = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [((2000, 2000), 0.0), ((1800, 2200), 0.6), ((1024, 1024), 0.3)]
        for seed, (shape, opacity) in enumerate(cases):
            path = Path(tmp) / f"phantom{seed}.dcm"
            phantoms.append(make_dicom(path, shape=shape, opacity=opacity, seed=seed))
            images.append(load_any(path, allocate=other.host_array))
    if args.images:
        suffixes = (".png", ".jpg", ".jpeg", ".dcm")
        files = sorted(f for f in args.images.rglob("*") if f.suffix.lower() in suffixes)
        step = max(1, len(files) // max(1, args.limit))
        images += [load_any(f, allocate=other.host_array) for f in files[::step][: args.limit]]
    cpu = Pipeline.from_bundle(args.model, device="cpu").run(images)
    gpu = other.run(images)
    gpu_b1 = [other.run([im])[0] for im in images[:4]]
    failures = 0
    for im, c, g in zip(images, cpu, gpu, strict=True):
        ok, text = compare(c, g)
        failures += not ok
        print(f"{'ok ' if ok else 'BAD'} {Path(im.source).name[:48]:48s} {text}")
    for im, g, g1 in zip(images, gpu, gpu_b1, strict=False):
        ok, text = compare(g1, g)
        failures += not ok
        print(f"{'ok ' if ok else 'BAD'} batch 1 vs batched, {Path(im.source).name[:30]:30s} {text}")
    if args.other == "cuda":
        # The DICOM images went to the GPU as their stored values, page-locked, and were looked up there:
        # check that this gives their pixels exactly, and the results of the float32 pixels' path.
        dicoms = [im for im in images if im.stored is not None and gp.stored_page_locked(im.stored.values)]
        kept = [im.stored for im in dicoms if im.stored is not None]
        looked_up, done = gp.upload_stored(kept, torch.device("cuda"), torch.cuda.Stream())
        if done is not None:
            done.synchronize()
        exact = bool(dicoms) and all(
            np.array_equal(t.cpu().numpy(), im.pixels) for t, im in zip(looked_up, dicoms, strict=True)
        )
        failures += not exact
        print(f"{'ok ' if exact else 'BAD'} {len(dicoms)} DICOM images copied to the device as stored "
              f"values, looked up there {'exactly' if exact else 'NOT exactly (or none)'}")

        def float_pixels(shape: tuple[int, int], dtype: np.dtype) -> np.ndarray | None:
            return other.host_array(shape) if np.dtype(dtype) == np.float32 else None

        as_float = [load_dicom(ds, allocate=float_pixels) for ds in phantoms]
        locked = [im.pixels for im in as_float if gp.is_page_locked(im.pixels)]
        copies, copied = gp.upload_page_locked(locked, torch.device("cuda"), torch.cuda.Stream())
        copied.synchronize()
        exact = bool(locked) and all(
            np.array_equal(t.cpu().numpy(), a) for t, a in zip(copies, locked, strict=True)
        )
        failures += not exact
        print(f"{'ok ' if exact else 'BAD'} {len(locked)} images decoded into page-locked float32 memory, "
              f"copied to the device {'exactly' if exact else 'NOT exactly (or none)'}")
        for im, g, f in zip(images, gpu, other.run(as_float), strict=False):
            ok, text = compare(f, g)
            failures += not ok
            name = Path(im.source).name[:20]
            print(f"{'ok ' if ok else 'BAD'} stored values vs float32 pixels, {name:20s} {text}")
    print(f"{len(images)} images, {failures} disagreements")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
