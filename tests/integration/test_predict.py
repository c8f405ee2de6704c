"""``cxr-node predict`` as a real process on a folder of mixed files: CSV rows and heatmap overlays."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.phantom import make_dicom, make_phantom
from inference.predict import CSV_COLUMNS, heatmap_name
from tests.fixtures.common import predict_in_process

pytestmark = pytest.mark.integration


def _grey_file(path: Path, shape: tuple[int, int], seed: int) -> None:
    pixels, _ = make_phantom(shape, seed=seed)
    Image.fromarray((pixels * 255).astype(np.uint8)).save(path)


def _predict(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRNODE_")}
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", "predict", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_predict_folder_of_mixed_files(tmp_path: Path, phantom_bundle: Path) -> None:
    data = tmp_path / "in"
    (data / "sub" / "deeper").mkdir(parents=True)
    make_dicom(data / "cr.dcm", shape=(512, 512), seed=1)
    make_dicom(data / "sub" / "dx_without_suffix", modality="DX", shape=(400, 520), seed=2,
               photometric="MONOCHROME1")
    _grey_file(data / "sub" / "frontal.png", (480, 480), seed=3)
    _grey_file(data / "sub" / "deeper" / "frontal.jpg", (600, 500), seed=4)
    _grey_file(data / "small.png", (100, 100), seed=5)
    (data / "corrupt.dcm").write_bytes(b"DICM" + os.urandom(300))
    (data / "notes.txt").write_text("not an image")
    out, heat = tmp_path / "out" / "preds.csv", tmp_path / "heat"

    proc = _predict(tmp_path, "--model", str(phantom_bundle), "--device", "cpu", "--cam", "gradcam",
                    "--heatmaps", str(heat), "--out", str(out), str(data), str(tmp_path / "missing.dcm"))
    assert proc.returncode == 0, proc.stderr
    assert "8 file(s)" in proc.stdout

    with out.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        rows = {Path(r["file"]).name: r for r in reader}
    assessable = ("cr.dcm", "dx_without_suffix", "frontal.png", "frontal.jpg")
    assert set(rows) == {*assessable, "small.png", "corrupt.dcm", "notes.txt", "missing.dcm"}
    # each row is the pipeline's answer for its file: the same model run here in-process agrees
    from inference.imaging import load_any
    from inference.pipeline import Pipeline

    pipeline = Pipeline.from_bundle(phantom_bundle, device="cpu", cam="gradcam")
    from inference.explain import overlay

    for name in assessable:
        row = rows[name]
        image = load_any(row["file"])
        [expected] = pipeline.run([image])
        assert expected.probability is not None and expected.lung_attention is not None
        # its heatmap PNG is this run's heatmap over this image (coloured: the grey image alone differs)
        assert expected.heatmap is not None and float(expected.heatmap.max()) > 0.5, name
        written = np.asarray(Image.open(heat / heatmap_name(Path(row["file"])))).astype(int)
        assert np.abs(written - overlay(image.pixels, expected.heatmap).astype(int)).max() <= 2, name
        assert float(row["probability"]) == pytest.approx(expected.probability, abs=1e-4), name
        assert float(row["lung_attention"]) == pytest.approx(expected.lung_attention, abs=1e-3), name
        assert row["finding"] == ("positive" if expected.probability >= pipeline.bundle.threshold
                                  else "negative"), row
        assert 0.0 < float(row["lung_fraction"]) < 1.0
        assert row["model_version"] == "0.0.0-test" and row["reason"] == ""
    assert rows["small.png"]["finding"] == "not_assessable"
    assert rows["small.png"]["reason_code"] == "too_small"
    for name in ("corrupt.dcm", "notes.txt", "missing.dcm"):  # every file is tried, whatever its name
        assert rows[name]["finding"] == "not_assessable", rows[name]
        assert rows[name]["reason_code"] == "undecodable" and rows[name]["reason"]
        assert rows[name]["probability"] == ""

    pngs = sorted(p.name for p in heat.iterdir())
    assert len(pngs) == 4
    overlay = Image.open(heat / heatmap_name(data / "sub" / "deeper" / "frontal.jpg"))
    assert overlay.mode == "RGB" and overlay.size == (500, 600)


def test_predict_without_model_uses_the_shipped_default(tmp_path: Path) -> None:
    from inference.bundle import ModelBundle, default_bundle_path
    from inference.phantom import make_dicom

    shipped = ModelBundle.load(default_bundle_path())
    make_dicom(tmp_path / "chest.dcm", shape=(512, 512), seed=3)
    out = tmp_path / "p.csv"
    code = predict_in_process(tmp_path, "--device", "cpu", "--out", str(out), str(tmp_path / "chest.dcm"))
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1
    assert rows[0]["model_version"] == shipped.version
    # the shipped stage 1 finds the frontal phantom's lungs; the finding follows the shipped threshold
    row = rows[0]
    assert row["finding"] in {"positive", "negative"} and row["reason_code"] == "", row
    assert (row["finding"] == "positive") == (float(row["probability"]) >= shipped.threshold), row


def test_predict_with_no_inputs_is_an_error(tmp_path: Path, tiny_bundle: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / ".hidden").write_text("left out, and said so")
    empty = str(tmp_path / "empty")
    code = predict_in_process(tmp_path, "--model", str(tiny_bundle), "--out", str(tmp_path / "p.csv"), empty)
    assert code == 2
    err = capsys.readouterr().err
    assert f"no files found in {empty}" in err and "left out: 1 hidden entries" in err
