"""Training loops, augmentation and packing on tiny synthetic data (a few steps, CPU)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from training.augment import augment
from training.loops import FitConfig, FitResult, _cls_loss, fit, predict, sample_weights

pytestmark = pytest.mark.unit


@pytest.fixture()
def phantoms(phantom_tensors: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return phantom_tensors


def test_augment_is_seeded_keeps_shapes_and_binary_masks() -> None:
    x = torch.rand(4, 1, 32, 32)
    m = (torch.rand(4, 1, 32, 32) > 0.5).float()
    before = x.clone()
    a1, m1 = augment(x, m, generator=torch.Generator().manual_seed(1))
    a2, m2 = augment(x, m, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a1, a2) and torch.equal(m1, m2) and torch.equal(x, before)
    assert a1.shape == x.shape and m1.shape == m.shape
    assert set(torch.unique(m1).tolist()) <= {0.0, 1.0}
    assert 0.0 <= float(a1.min()) and float(a1.max()) <= 1.0
    assert not torch.equal(a1, x)
    with pytest.raises(ValueError, match="x"):
        augment(torch.rand(32, 32))


def test_fit_classifier_checkpoint_and_resume(tmp_path: Path, phantoms: tuple) -> None:
    from inference.models.classifiers import build_classifier

    torch.set_num_threads(1)
    x, _, y = phantoms
    ck = tmp_path / "ck.pt"
    cfg = FitConfig(epochs=2, batch_size=8, max_steps=1, seed=0)
    r = fit(build_classifier("resnet18"), (x[:12], y[:12]), (x[12:], y[12:]), kind="classification",
            config=cfg, device=torch.device("cpu"), checkpoint=ck)
    scores = [h["val_score"] for h in r.history]
    assert len(scores) == 2 and r.best_epoch == scores.index(max(scores)) and r.best_score == max(scores)
    state = torch.load(ck, weights_only=True)
    assert state["finished"] and state["epoch"] == 1
    # resuming a finished run trains nothing more and returns the same best weights
    model = build_classifier("resnet18")
    r2 = fit(model, (x[:12], y[:12]), (x[12:], y[12:]), kind="classification", config=cfg,
             device=torch.device("cpu"), checkpoint=ck, resume=True)
    assert len(r2.history) == 2 and r2.best_epoch == r.best_epoch
    assert all(torch.equal(r.state[k], r2.state[k]) for k in r.state)
    p = predict(model, x, kind="classification", device=torch.device("cpu"), mean=0.5, std=0.25)
    assert p.shape == (16,)
    # the restored best weights answer as the finished run's did on validation
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y[12:].numpy(), p[12:].numpy()) == pytest.approx(r.best_score)


def test_fit_uses_deterministic_kernels_then_restores_the_earlier_choice(phantoms: tuple) -> None:
    from inference.models.classifiers import build_classifier

    torch.set_num_threads(1)
    x, _, y = phantoms
    seen: list[tuple[bool, bool, bool]] = []

    def look(_: dict[str, float]) -> None:
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                     torch.backends.cudnn.benchmark))

    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    torch.backends.cudnn.benchmark = True  # a process that asked for speed

    def run(on: bool) -> FitResult:
        torch.manual_seed(5)  # the same initial weights
        return fit(build_classifier("resnet18"), (x[:12], y[:12]), (x[12:], y[12:]), kind="classification",
                   config=FitConfig(epochs=2, batch_size=4, max_steps=2, seed=5, deterministic=on),
                   device=torch.device("cpu"), on_epoch=look)

    try:
        runs = [run(True), run(True), run(False)]
        after = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                 torch.backends.cudnn.benchmark)
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]
    assert seen == [(True, True, False)] * 4 + [(False, False, True)] * 2
    assert after == (before[0], before[1], True)
    # one seed, one network (on the CPU with either choice)
    assert all(torch.equal(runs[0].state[k], run.state[k]) for run in runs[1:] for k in runs[0].state)
    assert runs[0].history == runs[1].history


def test_sample_weights_balance_classes_and_sources_within_them() -> None:
    y = torch.tensor([0, 0, 0, 0, 1, 1])
    groups = torch.tensor([0, 0, 0, 1, 0, 1])  # class 0: three images of source 0, one of source 1
    # power 0: class balancing alone, N / (2 * images of the class)
    assert sample_weights(y, groups, 0.0).tolist() == pytest.approx([0.75] * 4 + [1.5] * 2)
    # power 1: within class 0 each source gets half of the class's weight 3
    assert sample_weights(y, groups, 1.0).tolist() == pytest.approx([0.5] * 3 + [1.5, 1.5, 1.5])
    # power 0.5: 1/sqrt(3) against 1, scaled so that class 0 weighs 3 in all
    k = 3 / (3 / np.sqrt(3) + 1)
    assert sample_weights(y, groups, 0.5).tolist() == pytest.approx([k / np.sqrt(3)] * 3 + [k, 1.5, 1.5])
    with pytest.raises(ValueError, match="same length"):
        sample_weights(y, groups[:3], 0.5)
    with pytest.raises(ValueError, match="power"):
        sample_weights(y, groups, 1.5)


def test_per_sample_loss_with_class_weights_equals_the_class_weighted_loss() -> None:
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 2, generator=g), torch.tensor([0, 0, 0, 0, 1, 1])
    class_w = torch.tensor([0.75, 1.5])
    per_sample = sample_weights(y, torch.zeros(6, dtype=torch.long), 0.5)  # one source: classes only
    plain = float(_cls_loss(logits, y, class_w))
    assert float(_cls_loss(logits, y, class_w, per_sample)) == pytest.approx(plain)
    up = per_sample.clone()
    up[0] *= 10
    assert float(_cls_loss(logits, y, class_w, up)) != pytest.approx(plain)


def test_fit_source_balanced_needs_one_group_per_image(phantoms: tuple) -> None:
    from inference.models.classifiers import build_classifier

    torch.set_num_threads(1)
    x, _, y = phantoms
    with pytest.raises(ValueError, match="source_balance"):
        FitConfig(source_balance=2.0)
    cfg = FitConfig(epochs=1, batch_size=8, max_steps=1, seed=0, source_balance=0.5)
    with pytest.raises(ValueError, match="one group id per training image"):
        fit(build_classifier("resnet18"), (x[:12], y[:12]), (x[12:], y[12:]), kind="classification",
            config=cfg, device=torch.device("cpu"), groups=torch.zeros(5, dtype=torch.long))
    r = fit(build_classifier("resnet18"), (x[:12], y[:12]), (x[12:], y[12:]), kind="classification",
            config=cfg, device=torch.device("cpu"), groups=torch.arange(12) % 3)
    assert len(r.history) == 1 and np.isfinite(r.history[0]["loss"])


def test_densenet_trains_despite_its_inplace_relu(phantoms: tuple) -> None:
    from inference.models.classifiers import build_classifier

    x, _, y = phantoms
    model = build_classifier("densenet121")
    r = fit(model, (x[:8, :, :32, :32], y[:8]), (x[8:, :, :32, :32], y[8:]), kind="classification",
            config=FitConfig(epochs=1, batch_size=4, max_steps=1), device=torch.device("cpu"))
    assert np.isfinite(r.history[0]["loss"])
    assert not model.features.relu5._forward_hooks  # the training hook is removed afterwards


@pytest.mark.parametrize("arch", ["unet", "lungvae"])
def test_fit_segmenter_learns_on_phantoms(arch: str, phantoms: tuple) -> None:
    from inference.models.segmentation import build_segmenter

    torch.set_num_threads(1)
    x, m, _ = phantoms
    cfg = FitConfig(epochs=12, batch_size=8, lr=0.003, seed=0, augment=False)
    r = fit(build_segmenter(arch), (x[:12], m[:12]), (x[12:], m[12:]), kind="segmentation", config=cfg,
            device=torch.device("cpu"))
    assert np.isfinite(r.history[-1]["loss"]) and r.history[-1]["loss"] < r.history[0]["loss"]
    assert r.best_score > 0.6  # enough steps to beat the empty mask clearly (validation Dice)


def test_fit_classifier_learns_on_phantoms(phantoms: tuple) -> None:
    from inference.models.classifiers import build_classifier

    torch.set_num_threads(1)
    x, _, y = phantoms
    cfg = FitConfig(epochs=6, batch_size=4, lr=0.002, seed=0, patience=6)
    r = fit(build_classifier("resnet18"), (x[:8], y[:8]), (x[8:], y[8:]), kind="classification",
            config=cfg, device=torch.device("cpu"))
    # validation ROC AUC over 4 + 4 images: 1.0 by chance once in 70 rankings
    assert r.history[0]["val_score"] < 1.0 and r.best_score == 1.0
    assert r.history[-1]["loss"] < r.history[0]["loss"]


@pytest.mark.parametrize("kind", ["classification", "segmentation"])
def test_fit_stops_with_a_clear_error_when_training_diverges(kind: str, phantoms: tuple,
                                                            tmp_path: Path) -> None:
    from dicom_node.errors import TrainingDiverged
    from inference.models.classifiers import build_classifier
    from inference.models.segmentation import build_segmenter

    torch.set_num_threads(1)
    x, m, y = phantoms
    classify = kind == "classification"
    model, target = (build_classifier("resnet18"), y) if classify else (build_segmenter("unet"), m)
    cfg = FitConfig(epochs=3, batch_size=8, max_steps=1, lr=1e30, seed=0)
    expected = r"lungs: training diverged in epoch 1: .* not finite; try a lower learning rate than 1e\+30"
    with pytest.raises(TrainingDiverged, match=expected):
        fit(model, (x[:12], target[:12]), (x[12:], target[12:]), kind=kind,  # type: ignore[arg-type]
            config=cfg, device=torch.device("cpu"), checkpoint=tmp_path / "ck.pt", name="lungs")
    assert not (tmp_path / "ck.pt").exists()  # nothing saved from the diverged epoch


@pytest.mark.parametrize(("patience", "epochs_run"), [(1, 2), (2, 3), (5, 5)])
def test_fit_stops_early_once_patience_epochs_bring_no_better_score(
        patience: int, epochs_run: int, phantoms: tuple, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Validation masks are empty and the U-Net starts out predicting no lung: Dice is 1.0, its maximum,
    from epoch 0 on, so no later epoch is better and the run stops after ``patience`` more epochs."""
    from inference.models.segmentation import build_segmenter

    torch.set_num_threads(1)
    x, m, _ = phantoms
    model = build_segmenter("unet")
    with torch.no_grad():
        model.head.bias.fill_(-100.0)  # every logit far below 0: an empty mask
    ck = tmp_path / "ck.pt"
    cfg = FitConfig(epochs=5, batch_size=8, max_steps=1, seed=0, patience=patience, checkpoint_every=10)
    caplog.set_level(logging.INFO, logger="training.loops")
    r = fit(model, (x[:8], m[:8]), (x[12:], torch.zeros_like(m[12:])), kind="segmentation", config=cfg,
            device=torch.device("cpu"), checkpoint=ck, name="seg")
    assert [h["val_score"] for h in r.history] == [1.0] * epochs_run
    assert r.best_epoch == 0 and r.best_score == 1.0
    stops = [rec for rec in caplog.records if getattr(rec, "action", "") == "train_early_stop"]
    if epochs_run < cfg.epochs:
        assert [(rec.run, rec.epoch) for rec in stops] == [("seg", patience)]  # type: ignore[attr-defined]
    else:
        assert stops == []
    assert torch.load(ck, weights_only=True)["epoch"] == epochs_run - 1  # the stopping epoch is saved


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("arch", ["unet", "lungvae"])
def test_fit_resumed_after_an_interruption_ends_as_an_uninterrupted_run(
        arch: str, phantoms: tuple, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Resume restores weights, optimiser, schedule, best state, history and every random state (shuffling
    and augmentation, the LungVAE's corruption and latent samples): the resumed run ends bit for bit as the
    uninterrupted one."""
    from inference.models.segmentation import build_segmenter

    torch.set_num_threads(1)
    x, m, _ = phantoms
    train, val = (x[:8], m[:8]), (x[12:], m[12:])
    cfg = FitConfig(epochs=4, batch_size=4, lr=0.01, seed=3, augment=True, patience=10, checkpoint_every=1)
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    whole = fit(build_segmenter(arch), train, val, kind="segmentation", config=cfg, device=cpu)

    def crash(row: dict[str, float]) -> None:
        if row["epoch"] == 1:  # before epoch 1 is checkpointed: the checkpoint holds epoch 0
            raise _Interrupted

    ck = tmp_path / "ck.pt"
    torch.manual_seed(0)
    with pytest.raises(_Interrupted):
        fit(build_segmenter(arch), train, val, kind="segmentation", config=cfg, device=cpu, checkpoint=ck,
            on_epoch=crash)
    assert torch.load(ck, weights_only=True)["epoch"] == 0
    torch.manual_seed(99)  # other initial weights: the checkpoint's must replace them
    caplog.set_level(logging.INFO, logger="training.loops")
    resumed = fit(build_segmenter(arch), train, val, kind="segmentation", config=cfg, device=cpu,
                  checkpoint=ck, resume=True)
    assert [getattr(rec, "epoch", None) for rec in caplog.records
            if getattr(rec, "action", "") == "train_resume"] == [1]
    assert len(whole.history) == 4 and whole.best_epoch >= 2  # the best epoch lies after the interruption
    assert resumed.history == whole.history
    assert (resumed.best_epoch, resumed.best_score) == (whole.best_epoch, whole.best_score)
    assert resumed.state.keys() == whole.state.keys()
    assert all(torch.equal(resumed.state[k], whole.state[k]) for k in whole.state)


@pytest.mark.parametrize("arch", ["unet", "lungvae"])
def test_fit_trains_only_lungvae_on_corrupted_inputs(arch: str, phantoms: tuple,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The lungvae sees the corrupted batch and reconstructs the clean one; the U-Net sees the batch."""
    import inference.models.segmentation as seg

    torch.set_num_threads(1)
    x, m, _ = phantoms
    calls: list[dict[str, Any]] = []
    real_corrupt, real_loss = seg.corrupt_for_imputation, seg.lungvae_loss

    def corrupt(xb: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = real_corrupt(xb, **kwargs)
        calls.append({"clean": xb.detach().clone(), "corrupted": out, "generator": kwargs.get("generator")})
        return out

    def loss(out: Any, target: torch.Tensor, clean_image: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
        calls[-1]["loss_clean"] = clean_image.detach().clone()
        return real_loss(out, target, clean_image, **kwargs)

    monkeypatch.setattr(seg, "corrupt_for_imputation", corrupt)
    monkeypatch.setattr(seg, "lungvae_loss", loss)
    model = seg.build_segmenter(arch)
    if arch == "lungvae":
        real_forward = model.forward_train
        seen: list[torch.Tensor] = []

        def forward_train(inp: torch.Tensor) -> Any:
            seen.append(inp)
            return real_forward(inp)

        model.forward_train = forward_train  # type: ignore[method-assign]
    cfg = FitConfig(epochs=2, batch_size=4, max_steps=1, seed=0, augment=False)
    r = fit(model, (x[:4], m[:4]), (x[12:], m[12:]), kind="segmentation", config=cfg,
            device=torch.device("cpu"))
    assert len(r.history) == 2
    if arch == "unet":
        assert calls == []
        return
    assert len(calls) == 2  # one batch per epoch
    batch = (x[:4].float() / 255.0 - cfg.mean) / cfg.std  # the normalised, unaugmented training images
    for call, fed in zip(calls, seen, strict=True):
        clean = call["clean"]
        assert clean.shape == batch.shape
        matches = [[j for j in range(4) if torch.equal(row, batch[j])] for row in clean]
        assert sorted(sum(matches, [])) == [0, 1, 2, 3]  # each training image once, in shuffled order
        assert fed is call["corrupted"] and not torch.equal(fed, clean)
        assert torch.equal(call["loss_clean"], clean)  # the reconstruction target is the uncorrupted batch
        assert isinstance(call["generator"], torch.Generator)


def test_fit_rejects_empty_sets(phantoms: tuple) -> None:
    from inference.models.classifiers import build_classifier

    x, _, y = phantoms
    with pytest.raises(ValueError, match="empty"):
        fit(build_classifier("resnet18"), (x[:0], y[:0]), (x, y), kind="classification", config=FitConfig(),
            device=torch.device("cpu"))
    with pytest.raises(ValueError, match="epochs"):
        FitConfig(epochs=0)


def test_pack_keeps_the_manifest_format(tmp_path: Path) -> None:
    import csv

    from PIL import Image

    from training.pack import pack
    from training.synthetic import make_phantom_dataset

    src = make_phantom_dataset(tmp_path / "src", patients=4, images_per_patient=1, size=96)
    counts = pack(src, tmp_path / "out", max_side=48, quality=85)
    assert counts["images"] == 4 and counts["masks"] == 4 and counts["rows"] == 8
    with (tmp_path / "out" / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    with src.open() as fh:
        assert list(csv.DictReader(fh).fieldnames or []) == list(rows[0].keys())
    for r in rows:
        with Image.open(tmp_path / "out" / r["file"]) as im:
            assert max(im.size) <= 48 and im.format == "JPEG"
        if r["mask_file"]:
            out = tmp_path / "out"
            with Image.open(out / r["mask_file"]) as mk, Image.open(out / r["file"]) as im:
                assert mk.size == im.size
    with pytest.raises(ValueError, match="max_side"):
        pack(src, tmp_path / "bad", max_side=8)


def test_report_names_source_balancing_when_a_candidate_used_it() -> None:
    from training.report import _selection_text

    plain = {"selection": {"min_attention": 0.7, "source_balance": 0.0},
             "configs": {"resnet18/whole seed 2": {"source_balance": 0.0}}}
    assert "source-balanced" not in _selection_text(plain)
    # a run without balancing that compares an earlier balanced network names the power it was trained with
    plain["configs"]["resnet18/whole seed 2 source-balanced"] = {"source_balance": 0.5}
    assert "balanced across sources within each class (power 0.50:" in _selection_text(plain)
    assert "style-augmented" not in _selection_text(plain)


def test_report_names_style_augmentation_when_a_candidate_used_it() -> None:
    from training.report import _selection_text

    results = {"selection": {"min_attention": 0.7, "style_augment": 0.0},
               "configs": {"resnet18/whole seed 2 style-augmented": {"style_augment": 0.5},
                           "resnet18/whole seed 0": {}}}
    text = _selection_text(results)
    assert "style-augmented were trained with texture degradations" in text
    assert "each with probability 0.50 per image" in text and "source-balanced" not in text
    assert "source-adversarial" not in text
    results["configs"]["resnet18/whole seed 2 source-adversarial"] = {"source_adversary": 0.5}
    assert "source adversary (weight 0.50, ramped up from 0)" in _selection_text(results)


def test_report_names_other_input_sizes_only_when_a_candidate_has_one() -> None:
    from training.report import _selection_text

    results = {"selection": {"min_attention": 0.7, "input_size": 224},
               "configs": {"resnet18/whole seed 0": {"input_size": 224}}}
    assert "px" not in _selection_text(results)
    results["configs"]["resnet18/whole seed 2 320 px"] = {"input_size": 320}
    assert ("Stage 2 inputs are 224 px; networks named with a size (320 px) take images of that size"
            in _selection_text(results))


def test_predict_moves_the_model_outside_inference_mode_so_grad_cam_can_follow() -> None:
    """A bundle loaded on the CPU and scored on CUDA is copied by ``predict``'s move; a copy made in
    inference mode would be an inference tensor that ``prepare_cam`` cannot set ``requires_grad`` on. Here
    the move copies (through float64) as a CPU-to-CUDA move does."""
    from inference.models.classifiers import build_classifier, prepare_cam

    class Copying(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = build_classifier("resnet18")

        def to(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return torch.nn.Module.to(torch.nn.Module.to(self, torch.float64), torch.float32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    model = Copying()
    before = model.net.fc.weight.data  # held, so the copy cannot reuse its memory
    p = predict(model, torch.zeros(2, 1, 32, 32, dtype=torch.uint8), kind="classification",
                device=torch.device("cpu"), mean=0.5, std=0.25)
    assert p.shape == (2,) and model.net.fc.weight.data_ptr() != before.data_ptr()  # moved: copied
    assert not any(q.is_inference() for q in model.parameters())
    prepare_cam("resnet18", model.net)
    assert model.net.layer4[-1].conv2.weight.requires_grad


def test_square_mode_tensors_are_the_pipelines_centre_squares(tmp_path: Path,
                                                              phantom_bundle_square: Path) -> None:
    from PIL import Image

    from inference.bundle import ModelBundle
    from inference.imaging import centre_crop, load_any
    from inference.phantom import make_phantom
    from inference.pipeline import Pipeline
    from training.candidates import stage2_inputs, stage2_masks
    from training.datasets import Sample
    from training.tensors import build_image_set, lung_crops, to_uint8

    samples = []
    for i, shape in enumerate([(300, 480), (480, 300)]):
        pixels, _ = make_phantom(shape, seed=70 + i)
        Image.fromarray(to_uint8(pixels)).save(tmp_path / f"p{i}.png")
        samples.append(Sample(tmp_path / f"p{i}.png", "covid", f"p{i}"))
    images = build_image_set(samples, seg_size=64, cls_size=64)
    bundle = ModelBundle.load(phantom_bundle_square)
    crops = lung_crops(bundle.segmenter, images, cls_size=64, device=torch.device("cpu"))
    pipe = Pipeline.from_bundle(phantom_bundle_square, device="cpu")
    try:
        results = pipe.run([load_any(s.file) for s in samples])
    finally:
        pipe.close()
    x, m = stage2_inputs("square", images, crops), stage2_masks("square", crops)
    assert x.shape == m.shape == (2, 1, 64, 64) and m.dtype == torch.bool
    for i, (s, r) in enumerate(zip(samples, results, strict=True)):
        px = load_any(s.file).pixels
        assert torch.equal(x[i, 0], torch.from_numpy(to_uint8(centre_crop(px, 64))))
        assert not torch.equal(x[i], images.whole[i])  # the whole image is padded, the square is not
        assert r.lung_mask is not None and m[i].any()
        # the lung-attention penalty sees the mask the pipeline finds, in the square input's frame
        expected = torch.from_numpy(centre_crop(r.lung_mask.astype(np.float32), 64) > 0.5)
        assert (m[i, 0] == expected).float().mean() > 0.99
    assert torch.equal(images.subset([1]).square, images.square[1:])
