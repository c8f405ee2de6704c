"""The counterfactual shortcut check, and selection on it: hand-made scorers with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.artefacts import bars
from training.candidates import choose
from training.counterfactual import counterfactual_check, counterfactual_from, probed
from training.report import _counterfactual_line, counterfactual_markdown

pytestmark = pytest.mark.unit

BARS = {"bars": lambda x: bars(x, torch.full((x.shape[0],), 0.25), torch.zeros(x.shape[0], dtype=torch.bool))}


def images() -> tuple[torch.Tensor, np.ndarray]:
    """4 normals (centre brightness 100-130) and 4 COVID-19 images (centre 160-190), uniform grey films."""
    levels = [100, 110, 120, 130, 160, 170, 180, 190]
    x = torch.stack([torch.full((1, 32, 32), v, dtype=torch.uint8) for v in levels])
    return x, np.array([0, 0, 0, 0, 1, 1, 1, 1])


def lungs_reader(x: torch.Tensor) -> np.ndarray:
    """Answers from the centre of the image only (where the lungs are)."""
    return (x[:, 0, 12:20, 12:20].float().mean(dim=(1, 2)) / 255.0).numpy()


def border_reader(x: torch.Tensor) -> np.ndarray:
    """Calls an image positive when its top rows are black (a padded, non-square film): a shortcut."""
    dark_top = (x[:, 0, :4].float().mean(dim=(1, 2)) < 10).float()
    return (0.5 * lungs_reader(x) + 0.5 * dark_top.numpy()).clip(0, 1)


def test_a_classifier_that_reads_the_lungs_keeps_its_answers() -> None:
    x, y = images()
    cf = counterfactual_check(lungs_reader, x, y, threshold=0.55, probes=BARS)
    assert cf["n"] == 8 and cf["plain"] == cf["probes"]["bars"]
    assert cf["plain"]["normals_positive"] == 0.0 and cf["plain"]["covid_negative"] == 0.0
    assert cf["roc_auc_with_copies"] == 1.0


def test_a_classifier_that_reads_the_padding_calls_marked_normals_positive() -> None:
    x, y = images()
    cf = counterfactual_check(border_reader, x, y, threshold=0.3, probes=BARS)
    # as they are: normals score 0.196-0.255 (< 0.3), COVID-19 0.314-0.373; with bars everyone gains 0.5
    assert cf["plain"]["normals_positive"] == 0.0 and cf["plain"]["covid_negative"] == 0.0
    assert cf["probes"]["bars"]["normals_positive"] == 1.0
    assert cf["probes"]["bars"]["normals_mean_probability"] == pytest.approx(0.5 + 115 / 255 / 2, abs=1e-6)
    # 16 images: each marked normal (0.696-0.755) outranks each plain COVID-19 image: 16 of 64 pairs lost
    assert cf["roc_auc_with_copies"] == pytest.approx(48 / 64)


def test_known_scores_are_not_computed_again_and_sizes_must_match() -> None:
    x, y = images()
    calls: list[int] = []

    def counting(batch: torch.Tensor) -> np.ndarray:
        calls.append(batch.shape[0])
        return lungs_reader(batch)

    counterfactual_check(counting, x, y, 0.5, plain=lungs_reader(x), probes=BARS)
    assert calls == [8]  # the probed copies only
    with pytest.raises(ValueError, match="8 images but y 7"):
        counterfactual_check(lungs_reader, x, y[:7], 0.5, probes=BARS)
    with pytest.raises(ValueError, match="uint8"):
        probed(x.float(), BARS["bars"])


def test_images_without_an_answer_are_counted_and_left_out() -> None:
    """Through the pipeline a marked image may be refused (no lungs found): it is counted, not scored 0."""
    y = np.array([0, 0, 1, 1])

    def score_with(probe: object) -> np.ndarray:
        return np.array([0.1, 0.2, 0.8, 0.9]) if probe is None else np.array([np.nan, 0.7, 0.8, 0.9])

    cf = counterfactual_from(score_with, y, 0.5, probes={"mark": lambda x: x})
    assert cf["probes"]["mark"] == {"normals_positive": 1.0, "covid_negative": 0.0,
                                    "normals_mean_probability": pytest.approx(0.7), "not_assessable": 1}
    assert "not_assessable" not in cf["plain"]
    assert cf["roc_auc_with_copies"] == 1.0  # 7 answers: every normal below every COVID-19 image
    with pytest.raises(ValueError, match="3 scores for 4 images"):
        counterfactual_from(lambda probe: np.zeros(4 if probe is None else 3), y, 0.5,
                            probes={"m": lambda x: x})


def test_probed_images_stay_uint8_and_every_default_probe_runs() -> None:
    x, y = images()
    out = probed(x, BARS["bars"], batch_size=3)
    assert out.dtype == torch.uint8 and int(out[0, 0, 0, 0]) == 0 and int(out[0, 0, 16, 16]) == 100
    cf = counterfactual_check(lungs_reader, x, y, 0.55)
    assert len(cf["probes"]) == 5
    for name in ("bars top and bottom (4:3 film)", "bars left and right (3:4 film)", "printed markers"):
        assert cf["probes"][name] == cf["plain"], name  # none of them reaches the centre


def config(auc: float, with_copies: float | None) -> dict:
    c: dict = {"mode": "whole", "val": {"roc_auc": auc}, "val_attention": {"positives": {"median": 0.9}}}
    if with_copies is not None:
        c["val_counterfactual"] = {"roc_auc_with_copies": with_copies}
    return c


def test_selection_stays_on_the_plain_validation_auc() -> None:
    """The check is reported, not selected on: a network trained with the marks passes it by construction."""
    configs = {"plain": config(0.99, 0.90), "trained on the marks": config(0.98, 0.97)}
    assert choose(configs, 0.7) == "plain"
    assert choose({"a": config(0.97, None), "b": config(0.98, 0.5)}, 0.7) == "b"


def test_the_report_shows_the_check_per_configuration_and_side() -> None:
    x, y = images()
    cf = counterfactual_check(border_reader, x, y, 0.3, probes=BARS)
    results = {"chosen": "net", "configs": {"net": {"val_counterfactual": cf, "test_counterfactual": cf},
                                            "old": {}}}
    md = counterfactual_markdown(results["configs"])
    assert md.splitlines()[0] == "| configuration | side | as they are | bars | ROC AUC with copies |"
    assert md.splitlines()[2:] == ["| net | val | 0.000 | 1.000 | 0.750 |",
                                   "| net | test | 0.000 | 1.000 | 0.750 |"]
    assert "calls 0.000 of the normal images positive as they are" in _counterfactual_line(results)
    assert "bars 1.000" in _counterfactual_line(results)
    assert counterfactual_markdown({"old": {}}) == "" and _counterfactual_line({"configs": {}}) == ""


def test_evaluate_puts_the_mark_on_the_decoded_image_at_its_own_size(tmp_path: Path) -> None:
    from PIL import Image

    from training.artefacts import PROBES
    from training.datasets import Sample
    from training.evaluate import _load

    Image.fromarray(np.full((80, 64), 128, dtype=np.uint8)).save(tmp_path / "a.png")
    sample = Sample(file=tmp_path / "a.png", label="normal", patient_id="p")
    plain = _load(sample)
    marked = _load(sample, probe=PROBES["bars top and bottom (4:3 film)"])
    assert marked.pixels.shape == (80, 64) and marked.pixels.dtype == np.float32
    assert (marked.pixels[:10] == 0).all() and (marked.pixels[70:] == 0).all()  # 12.5% of 80 rows
    assert np.array_equal(marked.pixels[10:70], plain.pixels[10:70]) and marked.meta == plain.meta
