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


def test_counterfactual_figures_in_the_card_and_readme_are_the_evaluate_reports() -> None:
    """The model card and the README quote the shipped model's counterfactual check; the figures must be those
    of its ``cxr-node evaluate`` report, in percent."""
    cf = json.loads((default_bundle_path() / "report" / "metrics.json").read_text())["test_counterfactual"]
    pct = {k: round(100 * v["normals_positive"]) for k, v in cf["probes"].items()}
    plain = round(100 * cf["plain"]["normals_positive"])
    bars43, bars34 = pct["bars top and bottom (4:3 film)"], pct["bars left and right (3:4 film)"]
    card = " ".join((default_bundle_path() / "MODEL_CARD.md").read_text(encoding="utf-8").split())
    assert (f"{plain}% positive as they are, {bars43}% with the padding bars of a 4:3 film, {bars34}% with "
            f"those of a 3:4 film, {pct['printed markers']}% with printed markers, "
            f"{pct['histogram equalisation']}% after histogram equalisation and {pct['sharpening']}% after "
            "sharpening") in card
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert (f"it calls {bars43}% of the normals positive with the padding bars of a 4:3 film and "
            f"{pct['sharpening']}% once sharpened, against {plain}% as they are") in readme


def test_the_reports_and_the_card_figures_belong_to_the_shipped_bundle(tmp_path: Path) -> None:
    """REPORT.md is the rendering of results.json, the evaluate report was made with this bundle, and the
    figures the model card quotes are those of results.json: none can go stale alone."""
    from training.report import write_build_report

    folder = default_bundle_path()
    bundle = ModelBundle.load(folder)
    results = json.loads((folder / "results.json").read_text())
    rendered = write_build_report(tmp_path, results).read_text(encoding="utf-8")
    assert rendered == (folder / "REPORT.md").read_text(encoding="utf-8")
    evaluated = json.loads((folder / "report" / "metrics.json").read_text())
    assert evaluated["version"] == bundle.version
    assert evaluated["bundle_threshold"] == evaluated["threshold"] == pytest.approx(bundle.threshold)
    card = " ".join((folder / "MODEL_CARD.md").read_text(encoding="utf-8").split())
    assert f"Version {bundle.version} is" in card
    val_auc = results["configs"][results["chosen"]]["val"]["roc_auc"]
    assert f"It was chosen on validation ROC AUC ({val_auc:.4f})" in card
    test = results["test"]
    before = results["reference_configs"]["resnet18/whole seed 3 (1.4.0 run)"]["test"]  # 1.4.0's network
    assert before["specificity"] == pytest.approx(test["specificity"])
    assert (f"ROC AUC {test['roc_auc']:.3f} against {before['roc_auc']:.3f}, sensitivity "
            f"{test['sensitivity']:.3f} against {before['sensitivity']:.3f}, the same specificity "
            f"{test['specificity']:.3f}") in card


def test_the_registry_keeps_its_own_copy_of_the_shipped_model(tmp_path: Path) -> None:
    """Registered by its installed folder, the shipped model changed under the registry at the next upgrade
    (the registry said 1.5.0 while workers served the new one); a registered bundle must never change."""
    from dicom_node.db import init_db, make_engine
    from training import registry

    engine = make_engine(f"sqlite:///{tmp_path / 'registry.db'}")
    init_db(engine)
    current = registry.ensure_current(engine, tmp_path / "models")
    shipped = ModelBundle.load(default_bundle_path())
    kept = Path(current["path"])
    assert kept == (tmp_path / "models" / f"{shipped.name}-{shipped.version}").resolve()
    assert current["version"] == shipped.version == ModelBundle.load(kept).version
    assert (kept / "classifier.safetensors").read_bytes() == \
        (default_bundle_path() / "classifier.safetensors").read_bytes()
    assert registry.ensure_current(engine, tmp_path / "models") == current  # registered once
    engine.dispose()
