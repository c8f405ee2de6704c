"""Inference benchmark (a command, not a test): per-stage times and throughput, CPU or CUDA.

    python -m inference.benchmark --device cpu --batch 1,16 --out results.json
    python -m inference.benchmark --device cuda --batch 1,16,64 --out results.json

Input: synthetic chest phantoms written as 12-bit CR DICOM files of ``--size`` pixels (default 2000),
kept as bytes so that ``decode`` is measured from bytes. Without ``--model`` a bundle of the
default architecture (U-Net 256 px + DenseNet121 224 px, lung crop) is made with random stage 2
weights and a stage 1 fitted to phantoms for a few steps, so that both stages and the CAM run as
they would with a trained model.

Reported: per-stage medians at batch 1 (decode, preprocess, stage 1, stage 2, CAM, SR/SC build,
end-to-end from bytes); for every batch size: pipeline images/s with the CAM (as the node runs it)
against model+CAM images/s (both networks and the CAM on ready tensors, same device, same run), the
same without the CAM (``explain=False`` against the networks alone), and end-to-end images/s
(decode + pipeline). The two ratios pipeline / model are the GPU target's figures; pipeline and
networks alone are timed in turns, round after round, and the spread of the per-round ratios is
printed too. The SR/SC column needs ``dicom_node.outputs``; without it the column is skipped and the
table says so.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom import uid

log = logging.getLogger(__name__)

DEFAULT_ARCH: dict[str, Any] = {
    "seg_arch": "unet",
    "cls_arch": "densenet121",
    "seg_size": 256,
    "cls_size": 224,
}
STAGES = ("decode", "preprocess", "stage1", "stage2", "cam", "sr_sc", "end_to_end")
# Result.timings keys: seconds per image, batched stages as the batch's share; summed over a batch they
# give the batch's seconds per stage (pool stages summed over threads: CPU time, not wall time).
BATCH_STAGES = (
    "header", "preprocess", "stage1", "postprocess", "plausibility", "stage2", "cam", "mask_wait",
    "explain_map", "total",
)


def _batch_stages(results: list[Any]) -> dict[str, float]:
    return {k: sum(r.timings.get(k, 0.0) for r in results) for k in BATCH_STAGES}


SYNTAXES = {
    "explicit": uid.ExplicitVRLittleEndian,
    "j2k-lossless": uid.JPEG2000Lossless,
    "j2k": uid.JPEG2000,
    "htj2k-lossless": uid.HTJ2KLossless,
    "rle": uid.RLELossless,
}


def _phantom_bytes(size: int, count: int, syntax: str = "explicit") -> list[bytes]:
    from inference.phantom import make_dicom

    out = []
    for seed in range(count):
        ds = make_dicom(
            shape=(size, size),
            bits_stored=12,
            seed=seed,
            opacity=0.3 * (seed % 2),
            transfer_syntax=SYNTAXES[syntax],
        )
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def _outputs_builder() -> Callable[..., Any] | None:
    try:
        from dicom_node.config import ExportSettings
        from dicom_node.outputs import build_outputs
    except ImportError as exc:
        log.warning("SR/SC build not measured: %s", exc, extra={"action": "benchmark_no_outputs"})
        return None
    settings = ExportSettings()
    return lambda ds, img, res, card: build_outputs(ds, img, res, card, settings)


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def _model_runner(pipeline: Any, n: int, with_cam: bool) -> Callable[[], None]:
    """A function running one batch of ``n`` through both networks alone on ready device tensors (no decode,
    no pre- or post-processing).

    The networks run exactly as the pipeline runs them: stage 1 in fp32, stage 2 under the pipeline's
    autocast, both outputs read back to the host.
    """
    from inference.explain import explain_forward

    b = pipeline.bundle
    x1 = pipeline._tensor([np.random.rand(b.segmenter_size, b.segmenter_size).astype(np.float32)] * n)
    x2 = pipeline._tensor([np.random.rand(b.classifier_size, b.classifier_size).astype(np.float32)] * n)

    def once() -> None:
        pipeline._stage1(x1)
        if with_cam:
            explain_forward(
                pipeline.classifier,
                pipeline.target_layers,
                x2,
                pipeline.covid_index,
                pipeline.cam,
                pipeline.amp_dtype,
            )
        else:
            with torch.inference_mode(), pipeline._autocast():
                torch.softmax(pipeline.classifier(x2).float(), 1).cpu()

    return once


def _spread(values: list[float]) -> list[float]:
    """[min, median, max]."""
    return [min(values), statistics.median(values), max(values)]


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by ``args`` and return the results as a JSON-ready dict."""
    from pydicom import dcmread

    from inference.bundle import make_random_bundle
    from inference.imaging import load_dicom
    from inference.pipeline import Pipeline

    batches = sorted({int(b) for b in args.batch.split(",") if b.strip()})
    if not batches or min(batches) < 1:
        raise ValueError('Argument "--batch" must list positive integers, e.g. 1,16,64.')
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        t0 = time.perf_counter()
        model = args.model or make_random_bundle(
            Path(tmp) / "bundle",
            version="0.0.0-benchmark",
            fit_segmenter_steps=args.fit_steps,
            fit_device="cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu",
            **DEFAULT_ARCH,
        )
        setup_s = time.perf_counter() - t0
        pipeline = Pipeline.from_bundle(model, device=args.device, cam=args.cam, cpu_threads=args.cpu_threads,
                                        prep_workers=args.prep_workers)
    sync = pipeline._sync
    n_distinct = min(8, max(batches))
    blobs = _phantom_bytes(args.size, n_distinct, args.transfer_syntax)
    build = _outputs_builder()
    card = pipeline.bundle.card

    allocate: Any = pipeline.host_array  # as the worker decodes
    decoded_into = "Pipeline.host_array"
    if args.ordinary_arrays:
        allocate, decoded_into = None, "ordinary arrays"
    elif args.float_pixels:
        def allocate(shape: tuple[int, int], dtype: Any) -> Any:
            return pipeline.host_array(shape) if np.dtype(dtype) == np.float32 else None

        decoded_into = "Pipeline.host_array, float32 pixels"

    def decode(blob: bytes) -> tuple[Any, Any]:
        ds = dcmread(io.BytesIO(blob))
        return ds, load_dicom(ds, allocate=allocate)

    # Warm-up (first calls allocate, autotune, fill caches).
    for blob in blobs[:2]:
        ds, img = decode(blob)
        pipeline.run([img])
    stored_values = img.stored is not None  # whether the decoder kept the stored values (DICOM on CUDA)

    per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
    assessed = 0
    for i in range(args.repeats):
        blob = blobs[i % len(blobs)]
        t_start = time.perf_counter()
        ds, img = decode(blob)
        t_dec = time.perf_counter()
        (res,) = pipeline.run([img])
        t_pipe = time.perf_counter()
        if build is not None:
            build(ds, img, res, card)
        t_end = time.perf_counter()
        assessed += res.finding != "not_assessable"
        tm = res.timings
        per_stage["decode"].append(t_dec - t_start)
        per_stage["preprocess"].append(
            sum(tm.get(k, 0.0) for k in ("header", "preprocess", "postprocess", "plausibility"))
        )
        per_stage["stage1"].append(tm.get("stage1", 0.0))
        per_stage["stage2"].append(tm.get("stage2", 0.0))
        per_stage["cam"].append(tm.get("cam", 0.0) + tm.get("explain_map", 0.0))
        per_stage["sr_sc"].append(t_end - t_pipe if build is not None else float("nan"))
        per_stage["end_to_end"].append(t_end - t_start)

    throughput = []
    for n in batches:
        decoded = [decode(blobs[i % len(blobs)]) for i in range(n)]
        images = [img for _, img in decoded]
        reps = max(5, args.repeats // n) if n > 1 else args.repeats
        stage_runs: list[dict[str, float]] = []

        def batch_run(images: list[Any] = images, runs: list[dict[str, float]] = stage_runs) -> None:
            runs.append(_batch_stages(pipeline.run(images)))

        def batch_plain(images: list[Any] = images) -> None:
            pipeline.run(images, explain=False)

        # Pipeline and networks alone take turns, round after round, so that a machine that speeds up or slows
        # down during the run moves both sides of each ratio alike; every round gives one ratio of each kind.
        runs = {
            "pipeline": batch_run,
            "model_cam": _model_runner(pipeline, n, with_cam=True),
            "plain": batch_plain,
            "model": _model_runner(pipeline, n, with_cam=False),
        }
        for fn in runs.values():
            fn()  # warm-up
        stage_runs.clear()
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(reps):
            for k, fn in runs.items():
                times[k].append(_timed(fn, sync))

        def e2e(n: int = n) -> None:
            pipeline.run([decode(blobs[i % len(blobs)])[1] for i in range(n)])

        t_e2e = statistics.median(_timed(e2e, sync) for _ in range(max(1, reps // 2)))
        ips = {k: n / statistics.median(v) for k, v in times.items()}
        throughput.append(
            {
                "batch": n,
                "rounds": reps,
                "pipeline_ips": ips["pipeline"],
                "pipeline_no_cam_ips": ips["plain"],
                "end_to_end_ips": n / t_e2e,
                "model_only_ips": ips["model"],
                "model_cam_ips": ips["model_cam"],
                "ratio_pipeline_model_cam": ips["pipeline"] / ips["model_cam"],
                "ratio_pipeline_no_cam_model_only": ips["plain"] / ips["model"],
                "ratio_pipeline_model_only": ips["pipeline"] / ips["model"],
                # per round: [min, median, max] of (networks' time / pipeline's time)
                "ratio_rounds_model_cam": _spread(
                    [m / p for m, p in zip(times["model_cam"], times["pipeline"], strict=True)]
                ),
                "ratio_rounds_no_cam": _spread(
                    [m / p for m, p in zip(times["model"], times["plain"], strict=True)]
                ),
                "stage_s": {k: statistics.median(r.get(k, 0.0) for r in stage_runs) for k in BATCH_STAGES},
            }
        )
    if args.profile:
        _profile(pipeline, [decode(blobs[i % len(blobs)])[1] for i in range(max(batches))], args.profile)
    pipeline.close()
    device_name = (
        torch.cuda.get_device_name(pipeline.device)
        if pipeline.device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    return {
        "device": str(pipeline.device),
        "device_name": device_name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "autocast": str(pipeline.amp_dtype),
        "cam": args.cam,
        "image_size": args.size,
        "transfer_syntax": args.transfer_syntax,
        "decoded_into": decoded_into,
        "stored_values": stored_values,
        "model": str(args.model or "random weights, default architecture"),
        "architectures": card["architectures"],
        "input_sizes": card["input_sizes"],
        "bundle_setup_s": setup_s,
        "repeats": args.repeats,
        "assessed_share": assessed / args.repeats,
        "sr_sc_measured": build is not None,
        "batch1_stage_s": {
            s: {
                "median": _nan_stat(v, statistics.median),
                "p90": _nan_stat(v, lambda x: float(np.percentile(x, 90))),
            }
            for s, v in per_stage.items()
        },
        "throughput": throughput,
    }


def _profile(pipeline: Any, images: list[Any], path: str) -> None:
    """Profile one pipeline run with the CAM and one with ``explain=False`` into ``path``: for each, torch
    profiler tables (by device time, by CPU time), then the Python functions of the ``explain=False`` run
    (cProfile, main thread, by cumulative time)."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if pipeline.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    key = "self_cuda_time_total" if pipeline.device.type == "cuda" else "self_cpu_time_total"
    parts = []
    for explain in (True, False):
        with profile(activities=activities) as prof:
            pipeline.run(images, explain=explain)
            pipeline._sync()
        averages = prof.key_averages()
        parts += [
            f"== Pipeline.run, batch {len(images)}, explain={explain}",
            averages.table(sort_by=key, row_limit=30),
            averages.table(sort_by="cpu_time_total", row_limit=30),
        ]
    py = cProfile.Profile()
    py.enable()
    pipeline.run(images, explain=False)
    pipeline._sync()
    py.disable()
    text = io.StringIO()
    pstats.Stats(py, stream=text).sort_stats("cumulative").print_stats(40)
    parts += [f"== Python functions, batch {len(images)}, explain=False", text.getvalue()]
    Path(path).write_text("\n\n".join(parts) + "\n", encoding="utf-8")


def _nan_stat(values: list[float], fn: Callable[[list[float]], float]) -> float | None:
    clean = [v for v in values if v == v]
    return fn(clean) if clean else None


def format_table(res: dict[str, Any]) -> str:
    """The results as a plain-text table."""
    lines = [
        f"device {res['device']} ({res['device_name']}), torch {res['torch']}, "
        f"threads {res['torch_threads']}, load average {res['load_average']}, "
        f"autocast {res['autocast']}, {res['cam']}, {res['image_size']}x{res['image_size']} CR "
        f"({res['transfer_syntax']}, decoded into {res.get('decoded_into', 'ordinary arrays')}"
        f"{', stored values kept' if res.get('stored_values') else ''}), "
        f"{res['architectures']['segmenter']} {res['input_sizes']['segmenter']} px + "
        f"{res['architectures']['classifier']} {res['input_sizes']['classifier']} px",
        f"assessed (both stages ran): {res['assessed_share']:.0%} of {res['repeats']} batch-1 runs",
        "",
        f"{'batch 1, seconds per image':<28}{'median':>10}{'p90':>10}",
    ]
    for stage, st in res["batch1_stage_s"].items():
        if st["median"] is None:
            lines.append(f"{stage:<28}{'skipped: dicom_node.outputs not importable':>40}")
        else:
            lines.append(f"{stage:<28}{st['median']:>10.4f}{st['p90']:>10.4f}")
    lines += [
        "",
        "images/s. pipeline: Pipeline.run on decoded images, with the CAM as the node runs it, or with",
        "explain=False; model: the networks alone on ready device tensors, same run; bytes->result: + decode",
        f"{'batch':>6}{'pipeline':>10}{'model+CAM':>11}{'pipe/model':>11}{'| no CAM:':>10}{'pipeline':>10}"
        f"{'model':>9}{'pipe/model':>11}{'| bytes->result':>16}",
    ]
    for t in res["throughput"]:
        lines.append(
            f"{t['batch']:>6}{t['pipeline_ips']:>10.1f}{t['model_cam_ips']:>11.1f}"
            f"{t['ratio_pipeline_model_cam']:>11.2f}{'':>10}{t['pipeline_no_cam_ips']:>10.1f}"
            f"{t['model_only_ips']:>9.1f}{t['ratio_pipeline_no_cam_model_only']:>11.2f}"
            f"{t['end_to_end_ips']:>16.1f}"
        )
    lines += [
        "",
        "the same ratios round by round (pipeline and networks alone take turns): min / median / max",
        f"{'batch':>6}{'rounds':>8}{'with CAM':>24}{'no CAM':>24}",
    ]
    for t in res["throughput"]:
        cam, plain = t["ratio_rounds_model_cam"], t["ratio_rounds_no_cam"]
        lines.append(
            f"{t['batch']:>6}{t['rounds']:>8}{' / '.join(f'{v:.2f}' for v in cam):>24}"
            f"{' / '.join(f'{v:.2f}' for v in plain):>24}"
        )
    lines += [
        "",
        "seconds per batch and stage (pipeline with the CAM; thread-pool stages are summed CPU time;",
        "mask_wait: the device path's wall time waiting for the pool's masks after its own work)",
        f"{'batch':>6}" + "".join(f"{k:>13}" for k in BATCH_STAGES),
    ]
    for t in res["throughput"]:
        lines.append(f"{t['batch']:>6}" + "".join(f"{t['stage_s'][k]:>13.4f}" for k in BATCH_STAGES))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m inference.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", metavar="DIR", help="model bundle (default: random weights, default architecture)"
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--batch", default="1,16", help="comma-separated batch sizes (default 1,16)")
    p.add_argument(
        "--repeats", type=int, default=10, help="batch-1 runs for the per-stage table (default 10)"
    )
    p.add_argument("--size", type=int, default=2000, help="phantom side in pixels (default 2000)")
    p.add_argument("--cam", choices=["gradcam", "gradcam++"], default="gradcam++")
    p.add_argument(
        "--transfer-syntax", choices=sorted(SYNTAXES), default="explicit",
        help="how the phantoms are encoded, i.e. what 'decode' measures (default explicit VR little endian)",
    )
    p.add_argument("--cpu-threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument(
        "--prep-workers", type=int, default=None,
        help="the pipeline's threads for per-image host work (default: the pipeline's, up to 8)",
    )
    p.add_argument(
        "--fit-steps", type=int, default=60, help="stage 1 phantom-fitting steps for a random bundle"
    )
    p.add_argument(
        "--ordinary-arrays", action="store_true",
        help="decode into ordinary arrays instead of the pipeline's host arrays (page-locked on CUDA), so "
        "that the CUDA path converts the images to float16 on the host on their way (for comparison)",
    )
    p.add_argument(
        "--float-pixels", action="store_true",
        help="decode the pixels into the pipeline's float32 host arrays (page-locked on CUDA) and keep no "
        "stored values, so that the CUDA path copies 4 bytes a pixel (the path before stored values, for "
        "comparison)",
    )
    p.add_argument("--out", metavar="JSON", help="write the results here as JSON")
    p.add_argument("--profile", metavar="TXT", help="profile one run at the largest batch into this file")
    args = p.parse_args(argv)
    if args.ordinary_arrays and args.float_pixels:
        p.error("--ordinary-arrays and --float-pixels exclude each other")
    if args.repeats < 1 or args.size < 256:
        p.error("--repeats must be >= 1 and --size >= 256")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    res = run_benchmark(args)
    print(format_table(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
