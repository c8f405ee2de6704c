"""C-STORE ingest benchmark: the same files sent by dcmtk ``storescu`` to dcmtk ``storescp`` and to
``cxr-node serve``, printed as images/s and as the ratio node/dcmtk.

Usage::

    .venv/bin/python benchmarks/ingest.py [--files 200] [--size 512] [--rounds 3] [--worker]

Both receivers get one association carrying all files (``storescu`` with every file on its command
line), on 127.0.0.1. storescp writes each file without fsync; the node writes each file with fsync
(file and directory) and commits one database row per instance (SQLite WAL, synchronous=FULL) before
answering, so the comparison is the node's durability against dcmtk's plain write. By default the
node's worker is off (``worker.run_in_serve = false``: ingest only); ``--worker`` runs it with a tiny
random model bundle, competing for the same CPUs. The best of ``--rounds`` rounds is reported for
each receiver (rounds alternate between the two).

storescp is measured twice: as shipped, and with ``TCP_NODELAY=1`` (dcmtk's own switch that
disables Nagle's algorithm). As shipped, each C-STORE response of storescp waits ~40 ms for a delayed
ACK on loopback (it writes the PDU header and body separately), so it manages only ~20 images/s here;
with the switch it is limited by the disk and the CPU. The ratio is printed against both.
"pynetdicom no-op" is a pynetdicom listener whose handler only takes the bytes (no spool, no
database, in this process): the ceiling for any listener built on pynetdicom here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from inference.phantom import make_dicom

CXR_NODE = Path(sys.executable).parent / "cxr-node"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _dcmtk_env(nodelay: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def _send(port: int, called_ae: str, files: list[Path], nodelay: bool) -> float:
    """Seconds for one storescu association carrying ``files``; raises if any store failed."""
    t0 = time.perf_counter()
    proc = subprocess.run(["storescu", "-R", "-aet", "BENCH", "-aec", called_ae, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, check=False,
                          env=_dcmtk_env(nodelay))
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0 or "Failed" in proc.stderr:
        raise RuntimeError(f"storescu failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


def _run_storescp(work: Path, files: list[Path], nodelay: bool) -> float:
    out = work / "storescp-in"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    port = _free_port()
    proc = subprocess.Popen(["storescp", "-aet", "DCMTK", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_dcmtk_env(nodelay))
    try:
        _wait_port(port, proc, 20)
        seconds = _send(port, "DCMTK", files, nodelay)
    finally:
        _stop(proc)
    received = len(list(out.iterdir()))
    if received != len(files):
        raise RuntimeError(f"storescp stored {received} of {len(files)} files")
    return seconds


def _run_node(work: Path, files: list[Path], round_no: int, model: Path | None, nodelay: bool) -> float:
    data = work / f"node-{round_no}"
    data.mkdir()
    port = _free_port()
    lines = ["[listener]", f"port = {port}", 'bind_address = "127.0.0.1"', 'ae_title = "CXRNODE"',
             "[storage]", f"data_dir = {json.dumps(str(data))}", "min_free_mb = 0",
             "[worker]", f"run_in_serve = {'true' if model else 'false'}", "[logging]", 'level = "WARNING"']
    if model:
        lines += ["[model]", f"path = {json.dumps(str(model))}", 'device = "cpu"']
    config = data / "cxr-node.toml"
    config.write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRNODE_")}
    log = (data / "node.log").open("wb")
    proc = subprocess.Popen([str(CXR_NODE), "serve", "--config", str(config)], stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    log.close()
    try:
        _wait_port(port, proc, 120)
        time.sleep(0.5)
        seconds = _send(port, "CXRNODE", files, nodelay)
    finally:
        _stop(proc)
    spooled = len(list((data / "spool").glob("*/*.dcm")))  # not the results folders beside them
    if spooled != len(files):
        raise RuntimeError(f"the node spooled {spooled} of {len(files)} files; see {data / 'node.log'}")
    return seconds


def _run_bare_pynetdicom(files: list[Path]) -> float:
    """pynetdicom with a handler that only takes the bytes: the ceiling for any pynetdicom listener."""
    from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE, evt

    from dicom_node.scp import MAX_PDU_BYTES

    ae = AE("BARE")
    ae.maximum_pdu_size = MAX_PDU_BYTES
    ae.add_supported_context(ComputedRadiographyImageStorage,
                             [ExplicitVRLittleEndian, ImplicitVRLittleEndian])

    def take(event: object) -> int:
        event.encoded_dataset()  # type: ignore[attr-defined]
        return 0x0000

    port = _free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, take)])
    try:
        return _send(port, "BARE", files, False)
    finally:
        server.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=200)
    p.add_argument("--size", type=int, default=512, help="image rows = columns (12-bit CR, uncompressed)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", action="store_true", help="run the node's worker (tiny random model) too")
    args = p.parse_args(argv)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            p.error(f"{tool} not found (install dcmtk)")
    work = Path(tempfile.mkdtemp(prefix="cxr-ingest-"))
    try:
        src = work / "files"
        src.mkdir()
        files = [src / f"{i:04d}.dcm" for i in range(args.files)]
        for i, f in enumerate(files):
            make_dicom(f, shape=(args.size, args.size), seed=i % 8)
        mb = sum(f.stat().st_size for f in files) / 1e6
        model = None
        if args.worker:
            from inference.bundle import make_random_bundle

            model = make_random_bundle(work / "model")
        runs: dict[str, list[float]] = {"dcmtk storescp (TCP_NODELAY=1)": [],
                                        "dcmtk storescp (default)": [], "cxr-node serve": [],
                                        "pynetdicom no-op (ceiling)": []}
        for r in range(args.rounds):
            runs["dcmtk storescp (TCP_NODELAY=1)"].append(_run_storescp(work, files, True))
            runs["dcmtk storescp (default)"].append(_run_storescp(work, files, False))
            runs["cxr-node serve"].append(_run_node(work, files, r, model, False))
            runs["pynetdicom no-op (ceiling)"].append(_run_bare_pynetdicom(files))
        worker = "running" if args.worker else "disabled"
        print(f"{args.files} files, {args.size}x{args.size} 12-bit CR uncompressed, {mb:.1f} MB, "
              f"one storescu association each, best of {args.rounds}; node worker {worker}")
        print(f"{'receiver':<32}{'seconds':>9}{'images/s':>10}{'MB/s':>8}   rounds (s)")
        rates = {}
        for name, times in runs.items():
            best = min(times)
            rates[name] = args.files / best
            print(f"{name:<32}{best:>9.2f}{rates[name]:>10.1f}{mb / best:>8.1f}   "
                  + " ".join(f"{t:.2f}" for t in times))
        node_rate = rates["cxr-node serve"]
        print(f"ratio node/dcmtk: {node_rate / rates['dcmtk storescp (TCP_NODELAY=1)']:.2f} against storescp "
              f"with TCP_NODELAY=1, {node_rate / rates['dcmtk storescp (default)']:.2f} against storescp as "
              "shipped (target >= 0.8)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
