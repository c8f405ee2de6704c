"""The class-conditional source adversary: gradient reversal, what its loss sees, and fit's use of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.adversary import SourceAdversary, adversary_loss, reverse_gradient
from training.loops import FitConfig, fit, sample_weights

pytestmark = pytest.mark.unit


def test_gradient_reversal_is_identity_forward_and_negates_backward() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    y = reverse_gradient(x)
    assert torch.equal(y, x)
    (y * torch.arange(3.0)).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, -torch.arange(3.0).expand(4, 3))


def test_the_adversary_learns_sources_while_the_features_get_the_opposite_gradient() -> None:
    torch.manual_seed(0)
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    feats = F.one_hot(groups, 3).float() + 0.05 * torch.randn(8, 3)  # features that name the source
    weights = sample_weights(y, groups, 1.0)
    adv = SourceAdversary(3, 3, hidden=16)
    opt = torch.optim.Adam(adv.parameters(), lr=0.05)
    first = float(adversary_loss(adv, feats, y, groups, weights).detach())
    for _ in range(150):
        opt.zero_grad()
        adversary_loss(adv, feats, y, groups, weights).backward()
        opt.step()
    assert float(adversary_loss(adv, feats, y, groups, weights).detach()) < 0.2 * first  # sources learnable
    # the features receive exactly the negated gradient of the adversary's own loss
    f = feats.clone().requires_grad_(True)
    adversary_loss(adv, f, y, groups, weights).backward()
    g = feats.clone().requires_grad_(True)
    plain = F.cross_entropy(adv.net(torch.cat([g, F.one_hot(y, 2).float()], 1)), groups, reduction="none")
    ((plain * weights).sum() / weights.sum()).backward()
    assert f.grad is not None and g.grad is not None and float(g.grad.abs().max()) > 0
    assert torch.allclose(f.grad, -g.grad)
    with pytest.raises(ValueError, match="two sources"):
        SourceAdversary(3, 1)


def test_the_adversary_loss_weighs_each_class_and_source_cell_alike() -> None:
    adv = SourceAdversary(2, 2)
    feats, y = torch.randn(5, 2), torch.tensor([0, 0, 0, 0, 0])
    groups = torch.tensor([0, 0, 0, 0, 1])  # one image of source 1 weighs as much as four of source 0
    w = sample_weights(y, groups, 1.0)
    assert w.tolist() == pytest.approx([0.3125, 0.3125, 0.3125, 0.3125, 1.25])
    with torch.no_grad():
        per = F.cross_entropy(adv(feats, y), groups, reduction="none")
        expect = 0.5 * per[:4].mean() + 0.5 * per[4]
        assert float(adversary_loss(adv, feats, y, groups, w)) == pytest.approx(float(expect), rel=1e-5)


def test_fit_with_a_source_adversary_checkpoints_and_resumes_it(tmp_path: Path,
                                                                phantom_tensors: tuple) -> None:
    from inference.models.classifiers import build_classifier

    torch.set_num_threads(1)
    x, _, y = phantom_tensors
    with pytest.raises(ValueError, match="source_adversary"):
        FitConfig(source_adversary=-1.0)
    cfg = FitConfig(epochs=2, batch_size=8, max_steps=1, seed=0, source_adversary=0.5, checkpoint_every=1)
    with pytest.raises(ValueError, match="at least two groups"):
        fit(build_classifier("resnet18"), (x[:12], y[:12]), (x[12:], y[12:]), kind="classification",
            config=cfg, device=torch.device("cpu"), groups=torch.zeros(12, dtype=torch.long))
    from inference.models.classifiers import ClassifierEnsemble

    pair = ClassifierEnsemble([build_classifier("resnet18"), build_classifier("resnet18")])
    with pytest.raises(ValueError, match="not an ensemble"):
        fit(pair, (x[:12], y[:12]), (x[12:], y[12:]), kind="classification", config=cfg,
            device=torch.device("cpu"), groups=torch.arange(12) % 3)
    ck = tmp_path / "adv.pt"
    groups = torch.arange(12) % 3
    model = build_classifier("resnet18")
    r = fit(model, (x[:12], y[:12]), (x[12:], y[12:]), kind="classification", config=cfg,
            device=torch.device("cpu"), groups=groups, checkpoint=ck)
    assert len(r.history) == 2 and all(np.isfinite(h["loss"]) for h in r.history)
    saved = torch.load(ck, map_location="cpu", weights_only=True)
    assert "adversary" in saved and saved["adversary"]["net.2.weight"].shape == (3, 64)
    assert not model.fc._forward_pre_hooks  # the feature hook is removed afterwards
    # resuming a finished run restores model and adversary from the checkpoint and trains no further
    again = fit(build_classifier("resnet18"), (x[:12], y[:12]), (x[12:], y[12:]), kind="classification",
                config=cfg, device=torch.device("cpu"), groups=groups, checkpoint=ck, resume=True)
    assert again.history == r.history and again.best_epoch == r.best_epoch
    assert all(torch.equal(again.state[k], r.state[k]) for k in r.state)
