"""build_default end to end on synthetic phantoms (CPU, --quick): data -> bundle -> the pipeline uses it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    import torch

    from training.build_default import main
    from training.synthetic import make_phantom_dataset

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("build")
    make_phantom_dataset(root / "data", patients=20, images_per_patient=2, size=80)
    out = root / "run"
    rc = main(["--data", str(root / "data"), "--out", str(out), "--device", "cpu", "--quick",
               "--epochs-seg", "2", "--epochs-cls", "1", "--archs", "mobilenet_v2", "--seg-archs", "unet"])
    assert rc == 0
    return out, json.loads((out / "results.json").read_text())


def test_outputs_and_split(built: tuple[Path, dict]) -> None:
    out, results = built
    split = json.loads((out / "split.json").read_text())
    train, val, test = set(split["train"]), set(split["val"]), set(split["test"])
    assert train and val and test
    assert not (train & val) and not (train & test) and not (val & test)
    assert set(results["configs"]) == {"mobilenet_v2/whole", "mobilenet_v2/lung"}
    assert results["chosen"] in results["configs"]
    for name, c in results["configs"].items():  # each threshold reaches the target sensitivity on validation
        assert c["val"]["sensitivity"] >= 0.95, name
        assert 0 < c["threshold"] < 1
        for side in ("val", "test"):  # the counterfactual check, at the configuration's own threshold
            cf = c[f"{side}_counterfactual"]
            assert cf["threshold"] == c["threshold"] and cf["n"] == c[side]["n"], name
            assert len(cf["probes"]) == 5 and math.isfinite(cf["roc_auc_with_copies"]), name
    assert set(results["baselines"]) == {"shape", "pixels64", "texture"}
    assert results["stage1"]["by_arch"]["unet"]["test"]["n"] > 0
    assert set(results["lung_attention"]) == set(results["configs"])
    assert "roc_auc_ci" in results["test"] and results["per_source"]
    report = (out / "report.md").read_text()
    assert "| configuration | val AUC |" in report and "(chosen)" in report
    assert "baseline shape" in report and "shape-normalised" in report and "baseline texture" in report
    assert "Within-source ROC AUC" in report
    assert "### Counterfactual check" in report and "| histogram equalisation |" in report
    assert "with counterfactual copies" in report
    lead = results["selection"]["lead"]  # the chosen configuration against the other, paired on validation
    assert {lead["over"], results["chosen"]} == set(results["configs"])
    assert lead["difference"] >= 0 and lead["ci"][0] <= lead["ci"][1]
    assert f"minus that of the next by this rule (`{lead['over']}`): {lead['difference']:+.4f}" in report
    from training.report import readme_results

    section = readme_results(results, "python -m training.build_default ...")
    assert section.startswith("## Results") and "(chosen)" in section and "logistic regression" in section
    assert "Within-source ROC AUC" in section and "Counterfactual check on test" in section
    assert "\n\nSelection by validation ROC AUC among" in section  # its own sentence, capitalised


def test_bundle_loads_and_runs_in_the_pipeline(built: tuple[Path, dict]) -> None:
    from inference.bundle import ModelBundle
    from inference.phantom import make_phantom
    from inference.pipeline import Pipeline
    from inference.types import XrayImage

    out, results = built
    bundle = ModelBundle.load(out / "bundle")
    chosen = results["configs"][results["chosen"]]
    assert bundle.threshold == pytest.approx(chosen["threshold"])
    assert bundle.crop_mode == chosen["mode"] and bundle.classifier_arch == "mobilenet_v2"
    assert bundle.card["metrics"]["test"]["n"] == results["test"]["n"]
    assert sum(p.stat().st_size for p in (out / "bundle").iterdir()) < 40 * 2**20
    img, _ = make_phantom((300, 280), opacity=0.7, seed=5)
    res = Pipeline.from_bundle(out / "bundle", device="cpu").run(
        [XrayImage(pixels=img, source="phantom", meta={"modality": "CR", "body_part": "CHEST",
                                                       "view_position": "PA"})], explain=False)
    assert res[0].model_version == bundle.version
    if res[0].probability is None:  # two quick epochs of stage 1 may find no lungs: then it says why
        assert res[0].finding == "not_assessable" and res[0].reason_code, res[0]
    else:
        assert res[0].finding == ("positive" if res[0].probability >= bundle.threshold else "negative")
    assert res[0].threshold == pytest.approx(bundle.threshold)


def test_resume_reuses_finished_checkpoints(built: tuple[Path, dict], tmp_path: Path) -> None:
    import torch

    from training.build_default import main

    out, first = built
    ck = torch.load(out / "checkpoints" / "stage2_mobilenet_v2_lung.pt", weights_only=True)
    assert ck["finished"] and ck["epoch"] == 0 and len(ck["history"]) == 1
    again = tmp_path / "run"
    shutil.copytree(out, again)
    shutil.rmtree(again / "bundle")
    checkpoints = sorted((again / "checkpoints").glob("*.pt"))
    assert {p.name for p in checkpoints} >= {"stage2_mobilenet_v2_lung.pt", "stage2_mobilenet_v2_whole.pt"}
    written = {p.name: p.stat().st_mtime_ns for p in checkpoints}
    rc = main(["--data", str(out.parent / "data"), "--out", str(again), "--device", "cpu", "--quick",
               "--epochs-seg", "2", "--epochs-cls", "1", "--archs", "mobilenet_v2", "--seg-archs", "unet",
               "--resume"])
    assert rc == 0
    # nothing was trained again: every checkpoint is the file the first run wrote, and the networks measure
    # as they did
    assert {p.name: p.stat().st_mtime_ns for p in sorted((again / "checkpoints").glob("*.pt"))} == written
    resumed = json.loads((again / "results.json").read_text())
    assert resumed["chosen"] == first["chosen"]
    for name, config in first["configs"].items():
        again_config = resumed["configs"][name]
        assert again_config["val"]["roc_auc"] == pytest.approx(config["val"]["roc_auc"], abs=1e-9), name
        assert again_config["threshold"] == pytest.approx(config["threshold"], abs=1e-9), name
    assert (again / "bundle" / "model.json").is_file()


def test_attention_penalty_build_with_a_reference_run(built: tuple[Path, dict], tmp_path: Path) -> None:
    from training.build_default import main

    out, first = built
    data = out.parent / "data"
    rc = main(["--data", str(data), "--out", str(tmp_path / "guided"), "--device", "cpu", "--quick",
               "--epochs-cls", "1", "--archs", "resnet18", "--modes", "whole,square", "--seg-archs", "",
               "--base-bundle", str(out / "bundle"), "--split", str(out / "split.json"),
               "--attention-weight", "1", "--reference", str(out / "results.json")])
    assert rc == 0
    results = json.loads((tmp_path / "guided" / "results.json").read_text())
    assert set(results["configs"]) == {"resnet18/whole", "resnet18/square"}
    assert results["configs"]["resnet18/square"]["mode"] == "square"
    lead = results["selection"].pop("lead")  # validation's margin of the chosen over the other candidate
    assert {lead["over"], results["chosen"]} == {"resnet18/whole", "resnet18/square"}
    assert results["selection"] == {"min_attention": 0.7, "attention_weight": 1.0, "input_size": 64,
                                    "source_balance": 0.0,
                                    "style_augment": 0.0, "source_adversary": 0.0, "artefact_augment": 0.0,
                                    "equalize": 0.0, "pretrained": 0.0,
                                    "references": [{"path": str(out / "results.json"), "label": "results",
                                                    "attention_weight": 1.0}]}
    assert results["reference_configs"].keys() == {f"{k} (results run)" for k in first["configs"]}
    for name in ("resnet18/whole", "resnet18/square"):
        assert math.isfinite(results["configs"][name]["val_attention"]["positives"]["median"])
    assert results["stage1"]["by_arch"]["unet"]["from"] == str(out / "bundle")
    report = (tmp_path / "guided" / "report.md").read_text()
    assert "mobilenet_v2/lung (results run)" in report and "lung-attention penalty (weight 1.00)" in report
    assert f"(results run): `{out / 'results.json'}`, penalty weight 1.00" in report
    assert "val lung attention (covid, median)" in report
    assert "## Comparison: architecture x {whole image, lung-segmented, centre square}" in report
    from inference.bundle import ModelBundle

    card = ModelBundle.load(tmp_path / "guided" / "bundle").card
    assert card["training_data"]["lung_attention_weight"] == 1.0
    assert card["crop_mode"] == results["configs"][results["chosen"]]["mode"]


def test_a_reference_from_another_split_is_refused_before_training(built: tuple[Path, dict],
                                                                   tmp_path: Path) -> None:
    from training.build_default import main

    out, first = built
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**first, "split": {"train": {"covid": 1}}}))
    with pytest.raises(ValueError, match="another split"):
        main(["--data", str(out.parent / "data"), "--out", str(tmp_path / "x"), "--device", "cpu", "--quick",
              "--archs", "resnet18", "--seg-archs", "", "--base-bundle", str(out / "bundle"),
              "--reference", str(other)])
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_references_added_to_a_finished_run_list_its_rows_beside_and_keep_the_selection(
        built: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m training.report RUN --reference R --write``, for a run made without its references."""
    from training.report import main as report_main

    out, first = built
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(out / "results.json", run / "results.json")
    with pytest.raises(SystemExit) as refused:
        report_main([str(run), "--reference", str(out / "results.json")])  # without --write
    assert refused.value.code == 2 and "add --write" in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**first, "split": {"train": {"covid": 1}}}))
    with pytest.raises(SystemExit):
        report_main([str(run), "--reference", str(other), "--write"])
    assert "another split" in capsys.readouterr().err
    assert "reference_configs" not in json.loads((run / "results.json").read_text())
    assert report_main([str(run), "--reference", str(out / "results.json"), "--write"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())
    assert results["reference_configs"].keys() == {f"{k} (results run)" for k in first["configs"]}
    assert results["chosen"] == first["chosen"] and results["configs"] == first["configs"]
    weight = first["selection"]["attention_weight"]
    assert results["selection"]["references"] == [{"path": str(out / "results.json"), "label": "results",
                                                   "attention_weight": weight}]
    row = f"| {first['chosen']} (results run) |"
    assert row in (run / "report.md").read_text() and row in printed


def test_seed_ensemble_from_an_earlier_bundle_stored_as_int8(built: tuple[Path, dict],
                                                             tmp_path: Path) -> None:
    """Also: the new network trains source-balanced, style-augmented and with a source adversary, and its name
    and the card say so."""
    from inference.bundle import ModelBundle
    from training.build_default import main

    out, first = built
    mode = first["configs"][first["chosen"]]["mode"]
    rc = main(["--data", str(out.parent / "data"), "--out", str(tmp_path / "ens"), "--device", "cpu",
               "--quick", "--epochs-cls", "1", "--archs", "mobilenet_v2", "--modes", mode, "--seg-archs", "",
               "--base-bundle", str(out / "bundle"), "--split", str(out / "split.json"), "--seed", "1",
               "--attention-weight", "0", "--add-bundles", str(out / "bundle"), "--ensemble", "3",
               "--int8-ensembles", "--source-balance", "0.5", "--style-augment", "0.3",
               "--source-adversary", "0.2", "--artefact-augment", "0.4"])
    assert rc == 0
    results = json.loads((tmp_path / "ens" / "results.json").read_text())
    one = f"mobilenet_v2/{mode} seed 1 source-balanced style-augmented source-adversarial artefact-augmented"
    zero, ens = f"mobilenet_v2/{mode} seed 0", f"mobilenet_v2/{mode} ensemble of 2"
    assert set(results["configs"]) == {one, zero, ens}
    assert sorted(results["configs"][ens]["members"]) == sorted([one, zero])
    assert results["configs"][zero]["from"] == str(out / "bundle")
    assert results["configs"][zero]["seed"] == 0 and results["configs"][one]["seed"] == 1
    assert results["selection"]["ensemble"] == 3  # asked for 3, the group has 2: the ensemble joins both
    assert results["selection"]["source_balance"] == 0.5
    assert [results["configs"][k]["source_balance"] for k in (one, zero, ens)] == [0.5, 0.0, 0.5]
    assert results["selection"]["style_augment"] == 0.3
    assert [results["configs"][k]["style_augment"] for k in (one, zero, ens)] == [0.3, 0.0, 0.3]
    assert [results["configs"][k]["source_adversary"] for k in (one, zero, ens)] == [0.2, 0.0, 0.2]
    assert [results["configs"][k]["artefact_augment"] for k in (one, zero, ens)] == [0.4, 0.0, 0.4]
    bundle = ModelBundle.load(tmp_path / "ens" / "bundle")
    chosen = results["configs"][results["chosen"]]
    assert bundle.card["training_data"]["source_balance"] == chosen["source_balance"]
    assert bundle.card["training_data"]["style_augment"] == chosen["style_augment"]
    assert bundle.card["training_data"]["source_adversary"] == chosen["source_adversary"]
    assert bundle.card["training_data"]["artefact_augment"] == chosen["artefact_augment"]
    assert bundle.classifier_members == (2 if results["chosen"] == ens else 1)
    # int8 (an ensemble) or float16 (one network) weights answer like the trained ones
    assert results["bundle_check"]["max_abs_diff_val"] < 0.05
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ens" / "bundle" / "classifier.safetensors"), "pt") as f:
        assert ("quantization" in (f.metadata() or {})) == (results["chosen"] == ens)
    # (decisions are not compared here: after two steps every probability sits at the threshold)
    report = (tmp_path / "ens" / "report.md").read_text()
    assert "ensemble of its 3 best networks by validation ROC AUC, or of all of them when it has fewer" in (
        " ".join(report.split()))
    assert "balanced across sources within each class (power 0.50:" in report
    assert "each with probability 0.30 per image" in report and "source adversary (weight 0.20" in report
    assert "printed markers, histogram equalisation and sharpening, each with probability 0.40" in (
        " ".join(report.split()))


def test_members_from_another_split_are_refused_before_training(built: tuple[Path, dict],
                                                                tmp_path: Path) -> None:
    from inference.bundle import make_random_bundle
    from training.build_default import main

    out, _ = built
    other = make_random_bundle(tmp_path / "other", seg_size=64, cls_size=64)
    with pytest.raises(ValueError, match="another split"):
        main(["--data", str(out.parent / "data"), "--out", str(tmp_path / "x"), "--device", "cpu", "--quick",
              "--archs", "mobilenet_v2", "--seg-archs", "", "--base-bundle", str(out / "bundle"),
              "--split", str(out / "split.json"), "--add-bundles", str(other), "--ensemble", "2"])
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_a_member_of_another_input_size_is_measured_at_its_own_size(built: tuple[Path, dict], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import training.baselines
    from inference.bundle import ModelBundle
    from training.build_default import main

    baseline_sizes: list[set[tuple[int, int]]] = []
    real_baselines = training.baselines.trivial_baselines

    def baselines(shapes: Any, centres: Any, y: Any, **kwargs: Any) -> Any:
        baseline_sizes.append({tuple(t.shape[-2:]) for t in centres.values()})
        return real_baselines(shapes, centres, y, **kwargs)

    monkeypatch.setattr(training.baselines, "trivial_baselines", baselines)

    out, _ = built
    common = ["--data", str(out.parent / "data"), "--device", "cpu", "--quick", "--epochs-cls", "1",
              "--archs", "mobilenet_v2", "--modes", "whole", "--seg-archs", "", "--base-bundle",
              str(out / "bundle"), "--split", str(out / "split.json")]
    assert main([*common, "--out", str(tmp_path / "s48"), "--cls-size", "48"]) == 0
    own = json.loads((tmp_path / "s48" / "results.json").read_text())
    assert ModelBundle.load(tmp_path / "s48" / "bundle").classifier_size == 48
    assert main([*common, "--out", str(tmp_path / "cmp"), "--add-bundles", str(tmp_path / "s48" / "bundle"),
                 "--ensemble", "2"]) == 0
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    small, run = "mobilenet_v2/whole seed 0 48 px", "mobilenet_v2/whole seed 0"
    assert set(results["configs"]) == {small, run}  # one network per size: no ensemble mixes sizes
    assert results["configs"][small]["input_size"] == 48 and results["configs"][run]["input_size"] == 64
    assert results["selection"]["input_size"] == 64
    # the same network on the same 48 px inputs as in its own run: the thresholds differ by float16 rounding
    measured = results["configs"][small]["threshold"]
    assert abs(measured - own["configs"]["mobilenet_v2/whole"]["threshold"]) <= (
        own["bundle_check"]["max_abs_diff_val"] + 1e-6)
    assert set(results["lung_attention"]) == {small, run}
    chosen = results["chosen"]
    shipped = ModelBundle.load(tmp_path / "cmp" / "bundle")
    assert shipped.classifier_size == results["configs"][chosen]["input_size"]
    assert "x input size {48 px, 64 px}" in shipped.card["training_data"]["selection"]
    assert shipped.card["metrics"]["counterfactual"] == results["configs"][chosen]["test_counterfactual"]
    assert shipped.card["training_data"]["network_seed"] == results["configs"][chosen]["seed"]
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "networks named with a size (48 px) take images of that size" in report
    # the trivial baselines are measured on the chosen network's input size, as `evaluate` measures them
    size = results["configs"][chosen]["input_size"]
    assert results["baselines_input_size"] == size and baseline_sizes[-1] == {(size, size)}
    assert f"(on the centre square at {size} px, the chosen network's input size)" in report


def test_fine_tuning_an_ensemble_trains_each_member_and_ships_the_ensemble(built: tuple[Path, dict],
                                                                          tmp_path: Path) -> None:
    from inference.bundle import ModelBundle, make_random_bundle
    from training.build_default import build_default

    out, _ = built
    base = make_random_bundle(tmp_path / "base", seg_size=64, cls_size=64, crop_mode="whole", members=2,
                              int8_classifier=True)
    results = build_default(out.parent / "data", tmp_path / "ft", device="cpu", quick=True, epochs_cls=1,
                            archs=("mobilenet_v2",), modes=("whole",), seg_archs=(), base_bundle=base,
                            fine_tune=True, split_file=out / "split.json", attention_weight=0.0,
                            int8_classifier=True)
    names = {"mobilenet_v2/whole member 1", "mobilenet_v2/whole member 2", "mobilenet_v2/whole ensemble of 2"}
    assert set(results["configs"]) == names
    assert results["chosen"] == "mobilenet_v2/whole ensemble of 2"
    assert [results["configs"][f"mobilenet_v2/whole member {i}"]["seed"] for i in (1, 2)] == [0, 1]
    assert sorted((tmp_path / "ft" / "checkpoints").iterdir()) == [
        tmp_path / "ft" / "checkpoints" / f"stage2_mobilenet_v2_whole_m{i}.pt" for i in (1, 2)]
    bundle = ModelBundle.load(tmp_path / "ft" / "bundle")
    assert bundle.classifier_members == 2
    members = bundle.card["training_data"]["ensemble_members"]
    assert set(members) == names - {"mobilenet_v2/whole ensemble of 2"}

    # That ensemble bundle (a shipped model) joins a later run as one candidate, named with its members'
    # seeds; it does not join a new ensemble, and the card of the run's choice records its members.
    later = build_default(out.parent / "data", tmp_path / "later", device="cpu", quick=True, epochs_cls=1,
                          archs=("mobilenet_v2",), modes=("whole",), seg_archs=(), base_bundle=out / "bundle",
                          split_file=out / "split.json", attention_weight=0.0, seed=2, ensemble=3,
                          cls_size=64, member_bundles=(tmp_path / "ft" / "bundle",), int8_classifier=True)
    added = "mobilenet_v2/whole ensemble of 2 (seeds 0, 1)"
    assert set(later["configs"]) == {"mobilenet_v2/whole seed 2", added}  # one single network: no ensemble
    assert later["configs"][added]["ensemble_of"] == members and later["configs"][added]["seed"] is None
    assert later["configs"][added]["from"] == str(tmp_path / "ft" / "bundle")
    from training.shipping import ensemble_members

    chosen = later["configs"][added]
    assert ensemble_members(chosen, later) == members  # what the card records when it is chosen
    assert ensemble_members(later["configs"]["mobilenet_v2/whole seed 2"], later) == {}
    shipped = ModelBundle.load(tmp_path / "later" / "bundle")
    assert shipped.classifier_members == (2 if later["chosen"] == added else 1)
    assert shipped.card["training_data"].get("ensemble_members", {}) == (
        members if later["chosen"] == added else {})


def test_equalised_networks_are_named_kept_out_of_mixed_ensembles_and_their_bundles_equalise(
        built: tuple[Path, dict], tmp_path: Path) -> None:
    """--equalize: the new network is named "equalised", never joins an ensemble with a plain one, and the
    card of the bundle says what the network does; fine-tuning an equalising network keeps it equalising."""
    from inference.bundle import ModelBundle, make_random_bundle
    from inference.models.classifiers import is_equalizing
    from training.build_default import build_default, main

    out, first = built
    mode = first["configs"][first["chosen"]]["mode"]
    assert main(["--data", str(out.parent / "data"), "--out", str(tmp_path / "eq"), "--device", "cpu",
                 "--quick", "--epochs-cls", "1", "--archs", "mobilenet_v2", "--modes", mode,
                 "--seg-archs", "", "--base-bundle", str(out / "bundle"), "--split", str(out / "split.json"),
                 "--seed", "1", "--attention-weight", "0", "--add-bundles", str(out / "bundle"),
                 "--ensemble", "2", "--equalize"]) == 0
    results = json.loads((tmp_path / "eq" / "results.json").read_text())
    eq, plain = f"mobilenet_v2/{mode} seed 1 equalised", f"mobilenet_v2/{mode} seed 0"
    assert set(results["configs"]) == {eq, plain}  # one network per group: no ensemble
    assert results["configs"][eq]["equalize"] == 1.0 and results["configs"][plain]["equalize"] == 0.0
    bundle = ModelBundle.load(tmp_path / "eq" / "bundle")
    chosen = results["configs"][results["chosen"]]
    assert bundle.equalize == bool(chosen["equalize"]) == is_equalizing(bundle.classifier)
    report = (tmp_path / "eq" / "report.md").read_text()
    assert "Networks named equalised histogram-equalise their input" in report

    base = make_random_bundle(tmp_path / "base", seg_size=64, cls_size=64, crop_mode="whole", equalize=True)
    tuned = build_default(out.parent / "data", tmp_path / "ft", device="cpu", quick=True, epochs_cls=1,
                          archs=("mobilenet_v2",), modes=("whole",), seg_archs=(), base_bundle=base,
                          fine_tune=True, split_file=out / "split.json", attention_weight=0.0)
    assert set(tuned["configs"]) == {"mobilenet_v2/whole equalised"}
    assert ModelBundle.load(tmp_path / "ft" / "bundle").equalize
    assert tuned["bundle_check"]["max_abs_diff_val"] < 0.05


def test_pretrained_networks_start_from_the_encoder_and_record_it(built: tuple[Path, dict],
                                                                  tmp_path: Path) -> None:
    """cxr-node pretrain on the training side (its validation and test patients left out), then a build with
    --init-weights: the network starts from the encoder's weights, is named "pretrained", and the results,
    the card and the report name the file and its SHA-256. A checkpoint that does not fit, a missing file or
    --init-weights with fine-tuning are refused before anything is trained."""
    import hashlib

    import torch

    from dicom_node.cli import main as cli
    from inference.bundle import ModelBundle
    from training.build_default import build_default, main
    from training.datasets import load_split, read_manifest

    out, first = built
    data, split = out.parent / "data", out / "split.json"
    assert cli(["pretrain", "--data", str(data), "--split", str(split), "--out", str(tmp_path / "ssl"),
                "--arch", "mobilenet_v2", "--size", "48", "--epochs", "1", "--batch-size", "8",
                "--device", "cpu", "--max-steps", "1", "--seed", "7"]) == 0
    record = json.loads((tmp_path / "ssl" / "pretrain.json").read_text())
    encoder = tmp_path / "ssl" / "encoder.safetensors"
    sha = hashlib.sha256(encoder.read_bytes()).hexdigest()
    held_out = set(load_split(split).val) | set(load_split(split).test)
    outside = [s for s in read_manifest(data) if s.task == "classification" and s.patient_id not in held_out]
    assert record["images"] == len(outside) > 0 and record["sha256"] == sha
    assert len(record["loss_per_epoch"]) == 1
    assert set(record["val_knn"]["pretrained"]) == {"roc_auc", "within_source_roc_auc"}

    mode = first["configs"][first["chosen"]]["mode"]
    args = ["--data", str(data), "--device", "cpu", "--quick", "--archs", "mobilenet_v2", "--modes", mode,
            "--seg-archs", "", "--base-bundle", str(out / "bundle"), "--split", str(split),
            "--attention-weight", "0"]
    with pytest.raises(ValueError, match="does not fit resnet18"):
        main([*args[:6], "resnet18", *args[7:], "--out", str(tmp_path / "bad"),
              "--init-weights", str(encoder)])
    with pytest.raises(ValueError, match="no such file"):
        main([*args, "--out", str(tmp_path / "bad"), "--init-weights", str(tmp_path / "absent.safetensors")])
    with pytest.raises(ValueError, match="fine-tuning"):
        build_default(data, tmp_path / "bad", device="cpu", quick=True, archs=("mobilenet_v2",), seg_archs=(),
                      base_bundle=out / "bundle", fine_tune=True, split_file=split, init_weights=encoder)
    assert not (tmp_path / "bad" / "checkpoints").exists()

    # A quick run trains two batches: the network's weights are still near the encoder's, far from those
    # of a random start.
    assert main([*args, "--out", str(tmp_path / "pt"), "--epochs-cls", "1",
                 "--init-weights", str(encoder)]) == 0
    results = json.loads((tmp_path / "pt" / "results.json").read_text())
    name = f"mobilenet_v2/{mode} pretrained"
    assert set(results["configs"]) == {name} and results["chosen"] == name
    assert results["configs"][name]["pretrained"] == 1.0 and results["selection"]["pretrained"] == 1.0
    assert results["configs"][name]["initial_weights"] == {"file": "encoder.safetensors", "sha256": sha}
    card = ModelBundle.load(tmp_path / "pt" / "bundle").card["training_data"]
    assert card["pretrained"] == 1.0 and card["initial_weights"]["sha256"] == sha
    assert "Networks named pretrained started from the weights of a local checkpoint" in (
        tmp_path / "pt" / "report.md").read_text()
    from safetensors.torch import load_file

    enc = load_file(str(encoder))
    trained = ModelBundle.load(tmp_path / "pt" / "bundle").classifier.state_dict()
    deep = "features.17.conv.2.weight"  # the last block's projection
    near = (trained[deep].float() - enc[deep]).abs().mean()
    torch.manual_seed(12345)
    from inference.models.classifiers import build_classifier

    far = (build_classifier("mobilenet_v2").state_dict()[deep] - enc[deep]).abs().mean()
    assert near < 0.2 * far
    # fine-tuning that bundle (what cxr-node retrain does) keeps the record of where its weights began
    tuned = build_default(data, tmp_path / "ft", device="cpu", quick=True, epochs_cls=1,
                          archs=("mobilenet_v2",), modes=(mode,), seg_archs=(),
                          base_bundle=tmp_path / "pt" / "bundle", fine_tune=True, split_file=split,
                          attention_weight=0.0)
    assert set(tuned["configs"]) == {name}
    card = ModelBundle.load(tmp_path / "ft" / "bundle").card["training_data"]
    assert card["pretrained"] == 1.0 and card["initial_weights"]["sha256"] == sha
    # brought into a later run as a candidate (--add-bundles), it keeps the record too
    assert main([*args, "--out", str(tmp_path / "add"), "--epochs-cls", "1", "--seed", "1",
                 "--add-bundles", str(tmp_path / "pt" / "bundle")]) == 0
    configs = json.loads((tmp_path / "add" / "results.json").read_text())["configs"]
    added = configs[f"mobilenet_v2/{mode} seed 0 pretrained"]
    assert added["pretrained"] == 1.0 and added["initial_weights"]["sha256"] == sha
    assert "initial_weights" not in configs[f"mobilenet_v2/{mode} seed 1"]
