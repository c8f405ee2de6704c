"""The lung-attention penalty of stage 2 training: its closed-form Grad-CAM++ equals pytorch-grad-cam's, it
moves the CAM into the lungs, and the build prefers configurations that look at the lungs on validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.attention import gradcampp_maps, head_linear, lung_attention_scores, outside_share
from training.loops import FitConfig, fit

pytestmark = pytest.mark.unit


@pytest.fixture()
def phantoms(phantom_tensors: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return phantom_tensors


@pytest.mark.parametrize("arch", ["densenet121", "resnet18", "mobilenet_v2"])
def test_closed_form_gradcampp_equals_pytorch_grad_cam(arch: str, phantoms: tuple) -> None:
    from inference.models.classifiers import build_classifier, cam_layers

    torch.manual_seed(0)
    x, masks, _ = phantoms
    model = build_classifier(arch).eval()
    with torch.no_grad():  # a head with both signs and a bias, as after training
        head_linear(model).weight.normal_(0, 0.05)
    reference = lung_attention_scores(model, arch, x[:4], masks[:4], device=torch.device("cpu"))
    layer, _ = cam_layers(arch, model)
    features: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _m, _i, out: features.append(out.detach().clone()))
    try:
        with torch.no_grad():
            model((x[:4].float() / 255.0 - 0.5) / 0.25)
    finally:
        hook.remove()
    maps = gradcampp_maps(features[0], head_linear(model).weight, 1)
    mine = 1.0 - outside_share(maps, masks[:4]).detach().numpy()
    assert np.isfinite(reference).all()
    np.testing.assert_allclose(mine, reference, atol=1e-4)


def test_attention_penalty_moves_the_cam_into_the_lungs() -> None:
    from inference.models.classifiers import build_classifier, cam_layers
    from inference.phantom import make_phantom

    torch.set_num_threads(1)
    pairs = [make_phantom((96, 96), opacity=0.8 if i % 2 else 0.0, seed=i) for i in range(16)]
    x = torch.from_numpy(np.stack([np.rint(p[0] * 255).astype(np.uint8) for p in pairs]))[:, None]
    masks = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None]
    y = torch.tensor([i % 2 for i in range(16)])
    scores = {}
    for weight in (0.0, 5.0):
        model = build_classifier("resnet18")
        cfg = FitConfig(epochs=10, batch_size=4, lr=0.002, seed=0, augment=False, attention_weight=weight)
        fit(model, (x, y), (x, y), kind="classification", config=cfg, device=torch.device("cpu"),
            train_masks=masks, cam_layer=cam_layers("resnet18", model)[0])
        assert not cam_layers("resnet18", model)[0]._forward_hooks  # the training hook is removed
        scores[weight] = float(np.nanmean(lung_attention_scores(model, "resnet18", x, masks,
                                                                device=torch.device("cpu"))))
    assert scores[5.0] > scores[0.0] + 0.08, scores


def test_attention_penalty_needs_masks_and_a_layer(phantoms: tuple) -> None:
    from inference.models.classifiers import build_classifier, cam_layers

    x, masks, y = phantoms
    model = build_classifier("resnet18")
    cfg = FitConfig(epochs=1, batch_size=8, max_steps=1, attention_weight=1.0)
    with pytest.raises(ValueError, match="lung mask"):
        fit(model, (x, y), (x, y), kind="classification", config=cfg, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="lung mask"):
        fit(model, (x, y), (x, y), kind="classification", config=cfg, device=torch.device("cpu"),
            train_masks=masks[:4], cam_layer=cam_layers("resnet18", model)[0])
    with pytest.raises(ValueError, match="attention_weight"):
        FitConfig(attention_weight=-1.0)


def test_selection_prefers_configurations_that_look_at_the_lungs() -> None:
    from training.candidates import choose as _choose

    def config(mode: str, auc: float, attention: float | None) -> dict:
        c: dict = {"mode": mode, "val": {"roc_auc": auc}}
        if attention is not None:
            c["val_attention"] = {"positives": {"median": attention}}
        return c

    configs = {"a/whole": config("whole", 0.99, 0.35), "b/whole": config("whole", 0.97, 0.75),
               "b/lung": config("lung", 0.96, 0.80)}
    assert _choose(configs, 0.7) == "b/whole"
    assert _choose(configs, 0.0) == "a/whole"
    assert _choose(configs, 0.9) == "a/whole"  # none reaches it: the best validation AUC
    configs["b/lung"]["val"]["roc_auc"] = 0.97
    assert _choose(configs, 0.7) == "b/lung"  # a tie goes to lung mode
    unmeasured = {"a/whole": config("whole", 0.99, None), "b/whole": config("whole", 0.97, None)}
    assert _choose(unmeasured, 0.7) == "a/whole"


def test_candidates_rank_by_the_selection_rule_and_a_full_tie_keeps_their_order() -> None:
    from training.candidates import choose, ranked

    def config(mode: str, auc: float, attention: float) -> dict:
        return {"mode": mode, "val": {"roc_auc": auc}, "val_attention": {"positives": {"median": attention}}}

    configs = {"seed 3": config("whole", 0.995, 0.99), "looks elsewhere": config("whole", 0.999, 0.3),
               "seed 5": config("whole", 0.990, 0.99), "ensemble": config("whole", 0.995, 0.99),
               "lung": config("lung", 0.990, 0.99)}
    assert ranked(configs, 0.7) == ["seed 3", "ensemble", "lung", "seed 5"]
    assert choose(configs, 0.7) == "seed 3"


def test_an_added_bundle_is_named_with_its_networks_seed_not_its_runs() -> None:
    from types import SimpleNamespace

    from training.candidates import bundle_recipe

    shipped = SimpleNamespace(equalize=False, classifier_members=1,
                              card={"training_data": {"seed": 0, "network_seed": 2}})
    assert bundle_recipe(shipped)["seed"] == 2
    single_run = SimpleNamespace(equalize=True, classifier_members=1, card={"training_data": {"seed": 3}})
    assert bundle_recipe(single_run) == {"seed": 3, "equalize": 1.0}
