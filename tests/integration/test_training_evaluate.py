"""cxr-node evaluate and cxr-node models through the real command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicom_node.cli import main

pytestmark = pytest.mark.integration


def test_evaluate_writes_the_report_folder(tmp_path: Path, phantom_bundle: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from training.synthetic import make_phantom_dataset

    torch.set_num_threads(1)
    make_phantom_dataset(tmp_path / "data", patients=20, images_per_patient=1, size=320)
    out = tmp_path / "report"
    rc = main(["evaluate", "--model", str(phantom_bundle), "--data", str(tmp_path / "data"),
               "--out", str(out), "--device", "cpu", "--bootstrap", "20", "--montage", "4"])
    assert rc == 0
    assert "report:" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    from inference.bundle import ModelBundle

    assert m["threshold"] == pytest.approx(ModelBundle.load(phantom_bundle).threshold)  # never tuned on test
    assert m["test"]["n"] + sum(m["not_assessable"].values()) == 2  # 2 test patients x 1 image
    assert set(m["lung_attention"]) == {"all", "positives", "negatives"}
    assert m["stage1"]["n"] + m["stage1"].get("no_mask", 0) == 2
    for name in ("roc.png", "pr.png", "confusion.png", "calibration.png", "report.md"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "## Per source" in report and "shape-normalised" in report
    pairs = sum(g["positives"] * (g["n"] - g["positives"]) for g in m["per_source"].values())
    assert m["within_source"]["pairs"] == pairs and "Within-source ROC AUC" in report
    cf = m["test_counterfactual"]  # the assessable test images again, with each mark
    assert cf["n"] == m["test"]["n"] and cf["threshold"] == m["threshold"] and len(cf["probes"]) == 5
    assert "### Counterfactual check" in report and "| histogram equalisation |" in report


def test_models_command_register_promote_rollback(tmp_path: Path, sqlite_url: str, phantom_bundle: Path,
                                                  tmp_path_factory: pytest.TempPathFactory,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from inference.bundle import ModelBundle, make_random_bundle

    other = make_random_bundle(tmp_path_factory.mktemp("b") / "second", seg_size=64, cls_size=64,
                               version="0.0.2-test")
    node = ["--db-url", sqlite_url, "--data-dir", str(tmp_path)]
    assert main(["models", *node, "--register", str(phantom_bundle)]) == 0
    assert main(["models", *node, "--register", str(other)]) == 0
    first, second = ModelBundle.load(phantom_bundle).version, "0.0.2-test"
    assert main(["models", *node, "--promote", first]) == 0
    assert main(["models", *node, "--rollback"]) == 1  # nothing earlier to go back to
    assert "no earlier promoted version" in capsys.readouterr().err
    assert main(["models", *node, "--promote", second]) == 0
    capsys.readouterr()
    assert main(["models", *node, "--json"]) == 0
    status = {v["version"]: v["status"] for v in json.loads(capsys.readouterr().out)["versions"]}
    assert status == {first: "retired", second: "current"}
    assert main(["models", *node, "--rollback"]) == 0
    capsys.readouterr()
    assert main(["models", *node, "--json"]) == 0
    status = {v["version"]: v["status"] for v in json.loads(capsys.readouterr().out)["versions"]}
    assert status == {first: "current", second: "rejected"}
    assert main(["models", *node, "--promote", "9.9.9"]) == 1
