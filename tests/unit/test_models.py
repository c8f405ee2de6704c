"""Stage 1 and stage 2 networks: build, forward, losses, checkpoint initialisation."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torchvision import models as tvm

from inference.models.classifiers import (
    CLASSIFIERS,
    ClassifierEnsemble,
    build_classifier,
    build_stage2,
    cam_layers,
    members_of,
)
from inference.models.segmentation import (
    SEGMENTERS,
    LungVAE,
    LungVAEOutput,
    build_segmenter,
    corrupt_for_imputation,
    dice_loss,
    lungvae_loss,
    segmentation_loss,
)

pytestmark = pytest.mark.unit


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", SEGMENTERS)
def test_segmenter_forward_shape(name: str) -> None:
    model = build_segmenter(name).eval()
    with torch.inference_mode():
        out = model(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 1, 64, 64)
    assert torch.isfinite(out).all()


def test_segmenter_sizes_are_small() -> None:
    assert 200_000 < n_params(build_segmenter("unet")) < 1_500_000
    assert 500_000 < n_params(build_segmenter("lungvae")) < 3_000_000


def test_unknown_architectures_are_refused() -> None:
    with pytest.raises(ValueError, match='"name"'):
        build_segmenter("segformer")
    with pytest.raises(ValueError, match='"name"'):
        build_classifier("vgg16")
    with pytest.raises(ValueError, match='"num_classes"'):
        build_classifier("resnet18", num_classes=1)


def test_lungvae_training_pass_and_loss() -> None:
    torch.manual_seed(0)
    model = LungVAE().train()
    clean = torch.randn(2, 1, 64, 64)
    target = (torch.rand(2, 1, 64, 64) > 0.5).float()
    out = model.forward_train(corrupt_for_imputation(clean, generator=torch.Generator().manual_seed(1)))
    assert out.logits.shape == out.reconstruction.shape == (2, 1, 64, 64)
    assert out.mu.shape == out.logvar.shape == (2, 16, 4, 4)
    losses = lungvae_loss(out, target, clean)
    assert set(losses) == {"seg", "recon", "kl", "total"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["total"].backward()
    assert model.mu.weight.grad is not None and model.recon_head.weight.grad is not None


def test_lungvae_eval_is_deterministic() -> None:
    model = LungVAE().eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), model(x))


def test_lungvae_kl_term_is_the_mean_kl_to_a_standard_normal() -> None:
    """KL(N(mu, exp(logvar)) || N(0, 1)) = (exp(logvar) + mu^2 - 1 - logvar) / 2 per latent element,
    averaged over the elements."""
    mu = torch.tensor([0.0, 1.0, 0.0, -2.0]).reshape(1, 4, 1, 1)
    logvar = torch.tensor([0.0, 0.0, math.log(2.0), math.log(0.5)]).reshape(1, 4, 1, 1)
    per_element = [0.0, 0.5, (1 - math.log(2.0)) / 2, (0.5 + 4 - 1 + math.log(2.0)) / 2]
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:6, 2:6] = 1
    clean = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = LungVAEOutput((target * 2 - 1) * 50, clean.clone(), mu, logvar)  # perfect mask and reconstruction
    losses = lungvae_loss(out, target, clean, kl_weight=0.25)
    assert float(losses["kl"]) == pytest.approx(sum(per_element) / 4, rel=1e-6)
    assert float(losses["recon"]) == 0.0 and float(losses["seg"]) == pytest.approx(0.0, abs=1e-6)
    assert float(losses["total"]) == pytest.approx(0.25 * sum(per_element) / 4, rel=1e-5)


def test_lungvae_samples_its_latent_in_training_mode() -> None:
    torch.manual_seed(0)
    model = LungVAE().train()
    x = torch.randn(2, 1, 32, 32)

    def logits(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.no_grad():
            return model(x)

    first = logits(1)
    assert torch.equal(first, logits(1))  # the difference below comes from the latent draw alone
    assert not torch.allclose(first, logits(2), atol=1e-6)


def test_corruption_changes_a_copy_only() -> None:
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    before = x.clone()
    y = corrupt_for_imputation(x, p_block=1.0, noise_std=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, before)
    assert y.shape == x.shape
    for i in range(len(x)):  # every image got at least one block, and nothing else changed
        changed = y[i] != x[i]
        assert changed.any()
        assert changed.float().mean() <= 4 * 0.25**2
    with pytest.raises(ValueError, match='"p_block"'):
        corrupt_for_imputation(x, p_block=2.0)
    noisy = corrupt_for_imputation(x, p_block=0.0, noise_std=0.1)
    assert 0.05 < float((noisy - x).std()) < 0.2


def test_dice_and_segmentation_loss_values() -> None:
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1
    perfect = (target * 2 - 1) * 50  # confident logits
    assert float(dice_loss(perfect, target)) == pytest.approx(0.0, abs=1e-6)
    assert float(segmentation_loss(perfect, target)) == pytest.approx(0.0, abs=1e-6)
    assert float(dice_loss(-perfect, target)) > 0.9


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_forward_and_cam_layers(name: str) -> None:
    model = build_classifier(name).eval()
    with torch.inference_mode():
        out = model(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 2)
    target, grad_layer = cam_layers(name, model)
    assert any(m is target for m in model.modules())
    assert list(grad_layer.parameters())


def test_ensemble_answers_the_mean_of_its_members_logits() -> None:
    torch.manual_seed(0)
    model = build_stage2("mobilenet_v2", 3).eval()
    assert isinstance(model, ClassifierEnsemble) and len(members_of(model)) == 3
    x = torch.randn(2, 1, 64, 64)
    with torch.inference_mode():
        logits = [m(x) for m in model.members]
        assert torch.allclose(model(x), (logits[0] + logits[1] + logits[2]) / 3, atol=1e-6)
    assert all(k.startswith("members.") for k in model.state_dict())
    single = build_stage2("mobilenet_v2")
    assert members_of(single) == [single] and not isinstance(single, ClassifierEnsemble)
    for bad in (0, 9, True, 1.5):
        with pytest.raises(ValueError, match='"members"'):
            build_stage2("mobilenet_v2", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='"members"'):
        ClassifierEnsemble([single])


def test_classifier_from_local_torchvision_checkpoint(tmp_path: Path) -> None:
    ref = tvm.resnet18(weights=None)
    ckpt = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), ckpt)
    model = build_classifier("resnet18", checkpoint=ckpt)
    assert torch.allclose(model.conv1.weight, ref.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    assert model.fc.out_features == 2


@pytest.mark.parametrize("name", ["densenet121", "mobilenet_v2", "densenet121 old names"])
def test_every_architecture_loads_a_torchvision_checkpoint(name: str, tmp_path: Path) -> None:
    """torchvision's state_dict of each architecture (3-channel), and DenseNet121 in the old key names of
    torchvision's release files ("denselayer1.norm.1.weight"; a transition's "norm.weight" is not renamed)."""
    arch = name.split()[0]
    ref = getattr(tvm, arch)(weights=None)
    state = ref.state_dict()
    if name.endswith("old names"):
        old = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.")
        state = {old.sub(r"\1.\2.", k): v for k, v in state.items()}
        assert "features.denseblock1.denselayer1.norm.1.weight" in state
        assert "features.transition1.norm.weight" in state
    torch.save(state, tmp_path / "c.pth")
    model = build_classifier(arch, checkpoint=tmp_path / "c.pth")
    ours, theirs = model.state_dict(), ref.state_dict()
    first = "features.conv0.weight" if arch == "densenet121" else "features.0.0.weight"
    assert torch.allclose(ours[first], theirs[first].sum(dim=1, keepdim=True))
    head = "classifier." if arch == "densenet121" else "classifier.1."
    for k, v in theirs.items():
        if k != first and not k.startswith(head):
            assert torch.equal(ours[k], v), k


def test_classifier_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        build_classifier("resnet18", checkpoint=tmp_path / "absent.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        build_classifier("resnet18", checkpoint=bad)
    other = tmp_path / "mobilenet.pth"
    torch.save(tvm.mobilenet_v2(weights=None).state_dict(), other)
    with pytest.raises(ValueError, match="does not fit resnet18"):
        build_classifier("resnet18", checkpoint=other)
