"""The shipped default model: it loads, and the README's Results section is generated from its results."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from inference.bundle import ModelBundle, default_bundle_path
from training.report import readme_results

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.unit


def test_default_bundle_loads_and_fits_the_size_budget() -> None:
    bundle = ModelBundle.load(default_bundle_path())
    assert bundle.card["targets"] == ["normal", "covid19"]
    assert 0.0 < bundle.threshold < 1.0
    size = sum(p.stat().st_size for p in default_bundle_path().rglob("*") if p.is_file())
    assert size <= 40 * 1024 * 1024, f"default model folder is {size / 2**20:.1f} MiB (budget 40 MiB)"


def test_readme_results_are_the_generated_ones() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- results:start \(generated: .*?--command \"(?P<cmd>[^\"]*)\"\) -->\n(?P<body>.*?)\n"
                  r"<!-- results:end -->", readme, re.S)
    assert m, "README has no generated Results block"
    results = json.loads((default_bundle_path() / "results.json").read_text())
    assert m["body"].strip() == readme_results(results, m["cmd"]).strip()


def test_card_metrics_match_the_training_results() -> None:
    card = ModelBundle.load(default_bundle_path()).card
    results = json.loads((default_bundle_path() / "results.json").read_text())
    chosen = results["configs"][results["chosen"]]
    assert card["architectures"]["classifier"] == chosen.get("arch", results["chosen"].split("/")[0])
    assert card["crop_mode"] == chosen.get("mode", results["chosen"].split("/")[1])
    assert card["architectures"].get("classifier_members", 1) == len(chosen.get("members", [None]))
    assert card["threshold"] == pytest.approx(chosen["threshold"])
    assert card["metrics"]["test"]["roc_auc"] == pytest.approx(results["test"]["roc_auc"])
