"""Self-supervised pretraining (training.pretrain): the loss, the backbone it writes, which images it uses,
resume, and the k-nearest-neighbour check of its features."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from training.datasets import Sample
from training.pretrain import (
    HEADS,
    PretrainConfig,
    backbone,
    epochs_within,
    knn_check,
    nt_xent,
    pretrain,
    pretrain_samples,
    save_encoder,
)

pytestmark = pytest.mark.unit


def test_nt_xent_matches_its_definition_written_out() -> None:
    """Each of the 2N views: -log(exp(sim to its partner / t) / sum over the 2N - 1 other views)."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    t = 0.5
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    total = 0.0
    for i in range(6):
        partner = (i + 3) % 6
        sims = [math.exp(float(z[i] @ z[j]) / t) for j in range(6) if j != i]
        total += -math.log(math.exp(float(z[i] @ z[partner]) / t) / sum(sims))
    assert float(nt_xent(z1, z2, t)) == pytest.approx(total / 6, rel=1e-5)


def test_nt_xent_is_low_when_views_agree_and_high_when_they_are_swapped() -> None:
    z = torch.eye(4) * 3
    assert float(nt_xent(z, z.clone(), 0.1)) < 1e-3
    assert float(nt_xent(z, z.roll(1, dims=0), 0.1)) > 5


@pytest.mark.parametrize("arch", sorted(HEADS))
def test_the_encoder_has_no_class_head_and_initialises_a_stage2_network(arch: str, tmp_path: Path) -> None:
    from inference.models.classifiers import build_classifier

    torch.manual_seed(0)
    model, width = backbone(arch)
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, width)
    sha = save_encoder(model, tmp_path / "encoder.safetensors")
    assert len(sha) == 64
    net = build_classifier(arch, checkpoint=tmp_path / "encoder.safetensors")
    own, saved = net.state_dict(), model.state_dict()
    head = HEADS[arch] + "."
    assert not any(k.startswith(head) for k in saved)
    for k, v in saved.items():  # every backbone weight, the first (one-channel) convolution included
        assert torch.equal(own[k], v), k
    assert net(torch.zeros(2, 1, 64, 64)).shape == (2, 2)


def test_only_images_of_patients_outside_validation_and_test_are_used() -> None:
    def s(pid: str, label: str, task: str = "classification") -> Sample:
        return Sample(file=Path(f"{pid}-{label}-{task}.png"), label=label, patient_id=pid, task=task)

    samples = [s("a", "covid"), s("b", "normal"), s("c", "other"), s("v", "covid"), s("t", "other"),
               s("a", "mask", "segmentation")]
    used = pretrain_samples(samples, {"v", "t"})
    assert [(x.patient_id, x.label) for x in used] == [("a", "covid"), ("b", "normal"), ("c", "other")]
    assert [x.patient_id for x in pretrain_samples(samples, {"v", "t"}, ("covid", "normal"))] == ["a", "b"]


def _images(n: int = 8, size: int = 32) -> torch.Tensor:
    from inference.phantom import make_phantom

    return torch.stack([torch.from_numpy((make_phantom((size, size), opacity=0.6 * (i % 2), seed=i)[0] * 255)
                                         .astype(np.uint8))[None] for i in range(n)])


def test_pretraining_changes_the_weights_and_resume_repeats_an_uninterrupted_run(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    images = _images()
    cfg = PretrainConfig(epochs=2, batch_size=4, seed=3, checkpoint_every=1)
    straight, history = pretrain(images, "mobilenet_v2", cfg, torch.device("cpu"))
    assert len(history) == 2 and all(math.isfinite(v) for v in history)
    torch.manual_seed(3)  # backbone() under the run's seed: the weights it started from
    start, _ = backbone("mobilenet_v2")
    changed = [k for k, v in straight.state_dict().items() if v.is_floating_point()
               and not torch.equal(v, start.state_dict()[k])]
    assert changed
    # The same run with checkpoints; the one of epoch 1 is kept as an interruption would have left it
    # (when epoch 2 reports, its checkpoint is not yet written).
    ck, interrupted = tmp_path / "pretrain.pt", tmp_path / "interrupted.pt"

    def keep(line: str) -> None:
        if line.startswith("pretrain epoch 2/"):
            shutil.copy(ck, interrupted)
        kernels.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic))

    kernels: list[tuple[bool, bool]] = []
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)
    pretrain(images, "mobilenet_v2", cfg, torch.device("cpu"), checkpoint=ck, say=keep)
    # deterministic kernels while it runs (training.loops.use_deterministic_kernels), the earlier choice after
    assert set(kernels) == {(True, True)}
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic) == before
    lines: list[str] = []
    resumed, history2 = pretrain(images, "mobilenet_v2", cfg, torch.device("cpu"), checkpoint=interrupted,
                                 resume=True, say=lines.append)
    assert lines[0] == "resumed pretraining at epoch 2" and len(lines) == 2
    assert history2[0] == history[0] and history2[1] == pytest.approx(history[1], rel=1e-5)
    for k, v in straight.state_dict().items():
        assert torch.allclose(v.float(), resumed.state_dict()[k].float(), atol=1e-5), k


def test_a_time_budget_cuts_the_epochs_after_the_first_and_resuming_keeps_the_cut(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    images, ck = _images(), tmp_path / "pretrain.pt"
    lines: list[str] = []
    cfg = PretrainConfig(epochs=4, batch_size=4, seed=1, checkpoint_every=1, time_budget=1e-6)
    _, history = pretrain(images, "resnet18", cfg, torch.device("cpu"), checkpoint=ck, say=lines.append)
    assert len(history) == 1  # shorter than one epoch: the first epoch is the whole run
    assert lines[0] == "time budget 0 s: 1 epochs of 4" and len(lines) == 2
    assert lines[1].startswith(f"pretrain epoch 1/1: loss {history[0]:.4f} (")
    assert torch.load(ck, weights_only=True)["epochs"] == 1
    _, again = pretrain(images, "resnet18", cfg, torch.device("cpu"), checkpoint=ck, resume=True)
    assert again == history  # nothing left to run
    roomy = PretrainConfig(epochs=3, batch_size=4, seed=1, time_budget=3600)
    assert len(pretrain(images, "resnet18", roomy, torch.device("cpu"))[1]) == 3


def test_epochs_within_a_budget_time_later_epochs_without_the_first_steps_start_up() -> None:
    # as on an H100: first epoch 2.0 s, 1.2 s of it in its first step, 5 steps an epoch -> 1.0 s an epoch
    assert epochs_within(100, 2.0, 1.2, 5, 400) == 99  # 2 s + 98 x 1 s
    assert epochs_within(100, 2.0, 1.2, 5, 60) == 60  # the epochs asked for are the most
    assert epochs_within(1.0, 2.0, 1.2, 5, 400) == 1  # the first epoch alone outran the budget
    assert epochs_within(10, 2.0, 2.0, 1, 400) == 5  # one step an epoch: every epoch as long as the first


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        PretrainConfig(batch_size=1)
    with pytest.raises(ValueError, match="artefacts"):
        PretrainConfig(artefacts=1.5)
    with pytest.raises(ValueError, match="time_budget"):
        PretrainConfig(time_budget=-1)
    with pytest.raises(ValueError, match='"images"'):
        pretrain(torch.zeros(4, 1, 32, 32), "resnet18", PretrainConfig(), torch.device("cpu"))
    with pytest.raises(ValueError, match='"arch"'):
        backbone("vgg16")


def test_knn_check_scores_validation_images_by_their_training_neighbours() -> None:
    """Features that carry the label: ROC AUC 1. Features that carry only the source, with one source per
    class in training and validation sources that lean to one class: 8.5 of 12 pairs overall (0.708), 0.5
    within the sources (every pair of one source is a tie)."""
    rng = np.random.default_rng(0)
    y_train = np.array([0] * 20 + [1] * 20)
    y_val = np.array([0, 0, 1, 0, 1, 1, 1])
    sources_val = ["a", "a", "a", "b", "b", "b", "b"]

    def feats(codes: np.ndarray) -> torch.Tensor:
        x = np.eye(3)[codes] + rng.normal(0, 0.01, (len(codes), 3))
        return torch.nn.functional.normalize(torch.as_tensor(x, dtype=torch.float32), dim=1)

    label = knn_check(feats(y_train), y_train, feats(y_val), y_val, sources_val)
    assert label == {"roc_auc": 1.0, "within_source_roc_auc": 1.0}
    # training: class 0 all from source a (code 0), class 1 all from b (code 1); validation features = source
    val_codes = np.array([0 if s == "a" else 1 for s in sources_val])
    source = knn_check(feats(y_train), y_train, feats(val_codes), y_val, sources_val, k=5)
    assert source["roc_auc"] == pytest.approx(8.5 / 12) and source["within_source_roc_auc"] == 0.5
    assert knn_check(feats(y_train), y_train, feats(y_val[:2]), y_val[:2], sources_val[:2]) == {
        "roc_auc": None, "within_source_roc_auc": None}
