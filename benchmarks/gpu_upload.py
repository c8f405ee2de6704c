"""How fast a batch of radiographs reaches the GPU (a benchmark, not a test):
``inference.gpu_preprocess.upload`` (one thread converts, chunk by chunk) against a thread pool uploading the
images side by side, against images decoded into page-locked memory (``Pipeline.host_array``) copied as they
are (``upload_page_locked``), against 12-bit stored values (uint16, page-locked) copied and looked up in their
tables on the device (``upload_stored``, as the pipeline takes DICOM images), and against the bus alone.

    python3 benchmarks/gpu_upload.py [--batch 64] [--size 2000] [--repeats 5]

Prints milliseconds per batch (medians): until the images are on the device, and the host's share, the time
until the call returns (what the upload thread spends; the rest is the copy engine's).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from inference import gpu_preprocess as gp
from inference.types import StoredValues


def _median_ms(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median milliseconds until the device has the data, and until ``fn`` returned on the host."""
    fn()
    torch.cuda.synchronize()
    times, host = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), 1e3 * statistics.median(host)


def _one(array: np.ndarray) -> torch.Tensor:
    return gp.upload([array], torch.device("cuda"))[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    rng = np.random.default_rng(0)
    arrays = [rng.random((args.size, args.size), dtype=np.float32) for _ in range(args.batch)]
    megabytes = sum(a.size for a in arrays) * 2 / 1e6
    print(
        f"{args.batch} images of {args.size}x{args.size} float32 -> {megabytes:.0f} MB float16 on "
        f"{torch.cuda.get_device_name(dev)}; torch threads {torch.get_num_threads()}"
    )
    rows: list[tuple[str, Callable[[], object]]] = [
        (f"one thread, chunks of {chunk}", lambda chunk=chunk: gp.upload(arrays, dev, chunk=chunk))
        for chunk in (8, 16)
    ]
    pools = [ThreadPoolExecutor(max_workers=n) for n in (4, 8, 16)]
    for n, pool in zip((4, 8, 16), pools, strict=True):
        rows.append(
            (f"pool of {n} threads, one image each", lambda pool=pool: list(pool.map(_one, arrays)))
        )
    locked = []
    for a in arrays:
        locked.append(torch.empty(a.shape, dtype=torch.float32, pin_memory=True).numpy())
        locked[-1][...] = a
    copy_stream = torch.cuda.Stream(dev)
    rows.append(("page-locked float32 as it is, copy stream",
                 lambda: gp.upload_page_locked(locked, dev, copy_stream)))
    stored = []
    for a in arrays:
        values = torch.empty(a.size * 2, dtype=torch.uint8, pin_memory=True).numpy().view(np.uint16)
        values = values.reshape(a.shape)
        values[...] = (a * 4095).astype(np.uint16)
        stored.append(StoredValues(values=values, table=rng.random(4096, dtype=np.float32), low=0))
    rows.append(("page-locked uint16 stored values, looked up",
                 lambda: gp.upload_stored(stored, dev, copy_stream)))
    ready = torch.empty(sum(a.size for a in arrays), dtype=torch.float16, pin_memory=True)
    target = torch.empty_like(ready, device=dev)
    rows.append(("bus alone (ready page-locked float16)", lambda: target.copy_(ready, non_blocking=True)))
    print(f"{'':<42}{'on device':>10}{'host':>10}")
    for name, fn in rows:
        total, host = _median_ms(fn, args.repeats)
        print(f"{name:<42}{total:>7.1f} ms{host:>7.1f} ms")
    for pool in pools:
        pool.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
