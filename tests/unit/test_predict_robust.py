"""``cxr-node predict`` keeps going whatever a file does, tries every file it finds, and strip or huge images
are refused before they are padded or decoded."""

from __future__ import annotations

import csv
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_node.errors import InvalidInstance
from inference import imaging
from inference.phantom import make_dicom, make_phantom
from inference.predict import heatmap_name
from inference.preprocess import PAD_VALUE, square_resize
from inference.types import XrayImage
from tests.fixtures.common import predict_in_process as _predict

pytestmark = pytest.mark.unit

UID_NAMES = ("CR.1.2.826.0.1.3680043.8.498.1234567.5", "1.2.840.113619.2.55.3.604688119.868.1234567890.123")


def _rows(csv_file: Path) -> dict[str, dict[str, str]]:
    with csv_file.open(newline="", encoding="utf-8") as fh:
        return {r["file"]: r for r in csv.DictReader(fh)}


def _png(path: Path, seed: int, shape: tuple[int, int] = (512, 512)) -> None:
    pixels, _ = make_phantom(shape, seed=seed)
    Image.fromarray((pixels * 255).astype(np.uint8)).save(path)


# ------------------------------------------------------------------------------------- one row per file


def test_heatmap_names_are_short_and_never_collide() -> None:
    assert heatmap_name(Path("a/x.png")) != heatmap_name(Path("a__x.png"))
    assert heatmap_name(Path("a/x.png")) == heatmap_name(Path("a/x.png"))  # a rerun overwrites its own
    deep = Path("PACS_EXPORT_2024", *(f"Series_1.2.840.113619.2.55.3.604688119.868.{i}" for i in range(6)),
                "IM_1.2.840.113619.2.55.3.604688119.868.1234567890.125.dcm")
    name = heatmap_name(deep)
    assert len(name.encode("utf-8")) <= 130 and name.endswith(".png")
    assert name.startswith("IM_1.2.840.113619.2.55.3.604688119.868.1234567890.125.dcm-")  # readable tail
    latin1 = Path(os.fsdecode(b"in/M\xfcller.png"))
    assert heatmap_name(latin1).encode("utf-8")  # a name any file system takes


def test_a_path_too_long_for_a_heatmap_name_costs_nothing(tmp_path: Path, phantom_bundle: Path) -> None:
    deep = tmp_path / "in" / "PACS_EXPORT_2024-03-11_Radiology_Department_Chest_Xray_Archive"
    deep = deep / "Study_1.2.840.113619.2.55.3.604688119.868.1234567890.123"
    deep = deep / "Series_1.2.840.113619.2.55.3.604688119.868.1234567890.124"
    deep.mkdir(parents=True)
    long_file = deep / "IM_1.2.840.113619.2.55.3.604688119.868.1234567890.125.dcm"
    assert len("__".join(long_file.parts[1:])) > 255  # the flattened path is longer than a file name may be
    make_dicom(long_file, shape=(512, 512), seed=1)
    make_dicom(tmp_path / "in" / "zz_after.dcm", shape=(512, 512), seed=2)
    heat, out = tmp_path / "heat", tmp_path / "p.csv"
    code = _predict(tmp_path, "--model", str(phantom_bundle), "--device", "cpu", "--cam", "gradcam",
                    "--batch-size", "1", "--heatmaps", str(heat), "--out", str(out), str(tmp_path / "in"))
    assert code == 0
    rows = _rows(out)
    assert set(rows) == {str(long_file), str(tmp_path / "in" / "zz_after.dcm")}
    for f, row in rows.items():
        assert row["finding"] in ("positive", "negative"), row
        assert (heat / heatmap_name(Path(f))).is_file(), f


def test_a_file_name_that_is_not_utf8_gets_its_row(tmp_path: Path, phantom_bundle: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    _png(folder / "a_first.png", 1)
    _png(Path(os.fsdecode(os.fsencode(folder) + b"/M\xfcller.png")), 2)  # a Latin-1 name on a UTF-8 system
    _png(folder / "z_last.png", 3)
    out = tmp_path / "p.csv"
    code = _predict(tmp_path, "--model", str(phantom_bundle), "--device", "cpu", "--batch-size", "1",
                    "--out", str(out), str(folder))
    assert code == 0
    rows = _rows(out)
    assert set(rows) == {f"{folder}/a_first.png", f"{folder}/M\\xfcller.png", f"{folder}/z_last.png"}
    assert all(r["finding"] in ("positive", "negative") for r in rows.values()), rows


def test_a_failure_in_the_pipeline_costs_one_row(tmp_path: Path, phantom_bundle: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    from inference.pipeline import Pipeline

    folder = tmp_path / "in"
    folder.mkdir()
    for i, name in enumerate(("a.png", "boom.png", "c.png")):
        _png(folder / name, i)
    real_run = Pipeline.run

    def run_or_fail(self: Pipeline, images: list[XrayImage], *args: object, **kw: object) -> object:
        if any(img.source.endswith("boom.png") for img in images):
            raise MemoryError()
        return real_run(self, images, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Pipeline, "run", run_or_fail)
    out = tmp_path / "p.csv"
    code = _predict(tmp_path, "--model", str(phantom_bundle), "--device", "cpu", "--batch-size", "3",
                    "--out", str(out), str(folder))
    assert code == 0
    rows = _rows(out)
    assert list(rows) == [f"{folder}/{n}" for n in ("a.png", "boom.png", "c.png")]  # the batch, in order
    failed = rows[f"{folder}/boom.png"]
    assert failed["finding"] == "not_assessable" and failed["reason_code"] == "error", failed
    assert "MemoryError" in failed["reason"] and failed["probability"] == ""
    for name in ("a.png", "c.png"):  # the rest of the batch was run image by image
        assert rows[f"{folder}/{name}"]["finding"] in ("positive", "negative")
    said = [r for r in caplog.records if getattr(r, "action", "") == "predict_failed"]
    assert len(said) == 1 and "boom.png" in said[0].getMessage()


def test_a_heatmap_that_cannot_be_written_keeps_its_row(tmp_path: Path, phantom_bundle: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    folder, heat = tmp_path / "in", tmp_path / "heat"
    folder.mkdir()
    make_dicom(folder / "a.dcm", shape=(512, 512), seed=1)
    make_dicom(folder / "b.dcm", shape=(512, 512), seed=2)
    (heat / heatmap_name(folder / "a.dcm")).mkdir(parents=True)  # a folder where the PNG would go
    out = tmp_path / "p.csv"
    code = _predict(tmp_path, "--model", str(phantom_bundle), "--device", "cpu", "--cam", "gradcam",
                    "--heatmaps", str(heat), "--out", str(out), str(folder))
    assert code == 0
    rows = _rows(out)
    assert [r["finding"] in ("positive", "negative") for r in rows.values()] == [True, True], rows
    assert (heat / heatmap_name(folder / "b.dcm")).is_file()
    assert f"1 heatmap(s) not written (see the log): {folder}/a.dcm" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- the walk


def test_every_file_is_tried_and_nothing_is_left_out_silently(tmp_path: Path, phantom_bundle: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    (folder / "real").mkdir(parents=True)
    (folder / "locked").mkdir()
    _png(folder / "locked" / "inside.png", 9)
    for i, name in enumerate(UID_NAMES):  # how storescp and PACS exports name their files
        make_dicom(folder / name, shape=(512, 512), seed=i)
    _png(folder / "real" / "frontal.png", 4)
    (tmp_path / "elsewhere").mkdir()
    _png(tmp_path / "elsewhere" / "linked.png", 5)
    os.symlink(tmp_path / "elsewhere", folder / "linked_folder")
    os.symlink("..", folder / "real" / "loop")
    os.symlink(tmp_path / "nonexistent.dcm", folder / "dangling.dcm")
    os.mkfifo(folder / "stream.fifo")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0" * 16)
    real_scandir = os.scandir

    def scandir(path: object = ".") -> object:  # a folder this user may not list
        if os.fspath(path).endswith("locked"):  # type: ignore[call-overload]
            raise PermissionError(13, "Permission denied", os.fspath(path))  # type: ignore[call-overload]
        return real_scandir(path)  # type: ignore[call-overload]

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "p.csv"
    code = _predict(tmp_path, "--model", str(phantom_bundle), "--device", "cpu", "--out", str(out),
                    str(folder))
    assert code == 0
    rows = _rows(out)
    assert set(rows) == {*(f"{folder}/{n}" for n in UID_NAMES), f"{folder}/real/frontal.png",
                         f"{folder}/linked_folder/linked.png", f"{folder}/dangling.dcm",
                         f"{folder}/stream.fifo", f"{folder}/notes.txt"}
    for name in UID_NAMES:
        assert rows[f"{folder}/{name}"]["finding"] in ("positive", "negative"), name
    for name in ("dangling.dcm", "stream.fifo", "notes.txt"):
        assert rows[f"{folder}/{name}"]["reason_code"] == "undecodable", name
    assert "not a regular file (a FIFO)" in rows[f"{folder}/stream.fifo"]["reason"]
    err = capsys.readouterr().err
    assert "left out:" in err
    assert f"1 folder(s) that cannot be listed ({folder}/locked: Permission denied)" in err
    assert f"{folder}/real/loop" in err and f"1 hidden entries ({folder}/.DS_Store)" in err


def test_a_second_run_does_not_read_its_own_csv_and_heatmaps(tmp_path: Path, phantom_bundle: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    make_dicom(folder / "chest.dcm", shape=(512, 512), seed=1)
    _png(folder / "frontal.png", 2)
    runs = []
    for _ in range(2):
        code = _predict(tmp_path, "--model", str(phantom_bundle), "--device", "cpu", "--cam", "gradcam",
                        "--heatmaps", str(folder / "heatmaps"), "--out", str(folder / "preds.csv"),
                        str(folder))
        assert code == 0
        runs.append(_rows(folder / "preds.csv"))
    assert set(runs[0]) == set(runs[1]) == {f"{folder}/chest.dcm", f"{folder}/frontal.png"}
    assert len(list((folder / "heatmaps").iterdir())) == 2


def test_batch_size_zero_is_refused(tmp_path: Path, phantom_bundle: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    _png(tmp_path / "frontal.png", 1)
    out = tmp_path / "p.csv"
    code = _predict(tmp_path, "--model", str(phantom_bundle), "--device", "cpu", "--batch-size", "0",
                    "--out", str(out), str(tmp_path / "frontal.png"))
    assert code == 2 and not out.exists()
    assert "--batch-size must be at least 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------- strips and huge images


def test_a_strip_is_not_assessable_before_it_is_padded(phantom_bundle: Path) -> None:
    from inference.pipeline import Pipeline

    strip = XrayImage(np.full((300, 2400), 0.5, dtype=np.float32), "strip",
                      {"modality": "CR", "body_part": "CHEST", "view_position": "PA"})
    code, text = imaging.header_reason(strip) or ("", "")
    assert code == "not_chest" and "2400x300" in text and "4:1" in text
    tall = XrayImage(np.zeros((1300, 300), dtype=np.float32), "tall", {})
    assert imaging.header_reason(tall) is not None
    film = XrayImage(np.zeros((4300, 3500), dtype=np.float32), "film", {})  # a 35 x 43 cm film
    assert imaging.header_reason(film) is None
    pipeline = Pipeline.from_bundle(phantom_bundle, device="cpu")
    try:
        [result] = pipeline.run([strip])
    finally:
        pipeline.close()
    assert result.finding == "not_assessable" and result.reason_code == "not_chest", result.reason


@pytest.mark.data
def test_every_image_of_the_data_set_has_an_assessable_shape(shared_data: Path) -> None:
    import pydicom

    with (shared_data / "manifest.csv").open(newline="") as fh:
        files = sorted({r["file"] for r in csv.DictReader(fh)})
    assert len(files) > 100
    for name in files:
        if name.endswith(".dcm"):
            ds = pydicom.dcmread(shared_data / name, stop_before_pixels=True)
            rows, cols = int(ds.Rows), int(ds.Columns)
        else:
            with Image.open(shared_data / name) as img:
                cols, rows = img.size
        assert max(rows, cols) <= imaging.MAX_ASPECT * min(rows, cols), name


def _padded_then_resized(pixels: np.ndarray, size: int) -> np.ndarray:
    """The definition of square_resize: the padded square built, then resized."""
    rows, cols = pixels.shape
    side = max(rows, cols)
    top, left = (side - rows) // 2, (side - cols) // 2
    square = np.full((side, side), PAD_VALUE, dtype=np.float32)
    square[top : top + rows, left : left + cols] = pixels
    img = Image.fromarray(square)
    return np.array(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def test_square_resize_is_the_padded_resize_bit_for_bit() -> None:
    rng = np.random.default_rng(7)
    shapes = [(512, 420), (420, 512), (2000, 1500), (1500, 2000), (301, 1200), (1200, 301), (257, 258),
              (600, 600), (30, 700), (700, 31)]
    for rows, cols in shapes:
        pixels = rng.random((rows, cols), dtype=np.float32)
        for size in (8, 64, 224, 320, 512, 1024):
            expected = _padded_then_resized(pixels, size)
            assert np.array_equal(square_resize(pixels, size), expected), (rows, cols, size)


def test_square_resize_never_builds_the_padded_square() -> None:
    pixels = np.zeros((64, 8192), dtype=np.float32)  # the padded square would be 256 MB
    tall = np.ascontiguousarray(pixels.T)
    tracemalloc.start()
    try:
        for image in (pixels, tall):
            tracemalloc.reset_peak()
            square_resize(image, 64)
            _, peak = tracemalloc.get_traced_memory()
            assert peak < 16 * 2**20, (image.shape, peak)
    finally:
        tracemalloc.stop()


def test_png_over_the_pixel_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    Image.new("1", (8192, 8193)).save(path)  # a few kB of file, 64 megapixels and a row
    assert 8192 * 8193 > imaging.MAX_PIXELS
    for load in (imaging.load_image_file, imaging.load_any):
        with pytest.raises(InvalidInstance, match=r"8192x8193 pixels is larger than the 64 megapixels"):
            load(path)
