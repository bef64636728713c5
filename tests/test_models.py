import json

import pytest
import torch
import torchvision

from dr_resnet import config
from dr_resnet.model.resnet import WeightsNotFoundError, build_resnet, count_parameters, imagenet_cache_path, resnet18, resnet50
from dr_resnet.registry import DEPTHS

TORCHVISION = {d: getattr(torchvision.models, f"resnet{d}") for d in DEPTHS}


def test_the_registry_holds_the_five_resnets():
    assert DEPTHS == (18, 34, 50, 101, 152)
    assert set(config.CHOICES["model.depth"]) == set(DEPTHS)  # what config validation accepts


@pytest.mark.parametrize("depth,expected", [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032),
                                            (101, 44_549_160), (152, 60_192_808)])
def test_parameter_counts_match_torchvision(depth, expected):
    assert count_parameters(build_resnet(depth, num_classes=1000)) == expected
    assert count_parameters(TORCHVISION[depth]()) == expected


@pytest.mark.parametrize("depth", DEPTHS)
def test_same_state_dict_gives_same_outputs_as_torchvision(depth):
    torch.manual_seed(depth)
    reference = TORCHVISION[depth]().eval()
    # Non-trivial BN statistics, so a mix-up of running_mean/var or of BN order would show.
    for m in reference.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ours = build_resnet(depth, num_classes=1000)
    ours.load_state_dict(reference.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-5)
    assert list(ours.state_dict()) == list(reference.state_dict())


def test_factories_default_to_five_grades():
    assert resnet18().fc.out_features == 5
    assert resnet50().fc.in_features == 2048


def test_zero_init_residual_zeroes_the_last_bn_of_every_block():
    model = build_resnet(50, zero_init_residual=True)
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    assert len(blocks) == 16
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)
    assert torch.all(model.layer1[0].bn1.weight == 1)


def _place_imagenet_file(depth: int) -> dict:
    """A torchvision-format 1000-class state dict where torchvision's cache expects the IMAGENET1K_V1 file."""
    torch.manual_seed(100 + depth)
    state = TORCHVISION[depth]().state_dict()
    path = imagenet_cache_path(depth)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


@pytest.mark.parametrize("depth", DEPTHS)
def test_imagenet_weights_load_from_torchvision_cache(torch_home, depth):
    state = _place_imagenet_file(depth)
    assert str(imagenet_cache_path(depth)).startswith(str(torch_home))
    model = build_resnet(depth, num_classes=5, weights="imagenet")
    loaded = model.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key
    assert model.fc.out_features == 5
    assert imagenet_cache_path(depth).name.startswith(f"resnet{depth}-")  # torchvision's own file name


def test_imagenet_weights_missing_offline_is_a_clear_error(torch_home):
    with pytest.raises(WeightsNotFoundError) as info:
        build_resnet(18, weights="imagenet")
    message = str(info.value)
    assert str(imagenet_cache_path(18)) in message
    assert "resnet18-f37072fd.pth" in message and "model.weights=" in message


def test_weights_from_a_checkpoint_file_with_ddp_prefix(tmp_path):
    source = build_resnet(18)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    model = build_resnet(18, weights=path)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_weights_file_that_does_not_fit_is_refused_in_one_line_naming_both(tmp_path):
    from dr_resnet.errors import UserError
    from dr_resnet.model.resnet import WeightsMismatchError, architecture_of

    path = tmp_path / "r50.pt"
    torch.save(build_resnet(50).state_dict(), path)
    with pytest.raises(WeightsMismatchError) as refused:
        build_resnet(18, weights=path)
    message = str(refused.value)
    assert isinstance(refused.value, UserError) and "\n" not in message
    assert message == (f"{path} holds ResNet50 weights; model.depth=18 builds a ResNet18: set model.depth=50 or give "
                       "weights of a ResNet18")
    assert [architecture_of(build_resnet(d).state_dict()) for d in DEPTHS] == list(DEPTHS)
    shrunk = build_resnet(18).state_dict()
    shrunk["layer1.0.conv1.weight"] = shrunk["layer1.0.conv1.weight"][:32]  # right blocks, a wrong shape
    torch.save(shrunk, tmp_path / "shrunk.pt")
    with pytest.raises(WeightsMismatchError, match="do not fit ResNet18: size mismatch for layer1.0.conv1.weight"):
        build_resnet(18, weights=tmp_path / "shrunk.pt")
    with pytest.raises(WeightsNotFoundError, match="nothing.pt"):
        build_resnet(18, weights=tmp_path / "nothing.pt")


def test_unknown_depth_is_refused():
    with pytest.raises(ValueError, match="depth must be one of 18, 34, 50, 101, 152, got 26"):
        build_resnet(26)
    with pytest.raises(config.ConfigError, match="model.depth=26 is not one of 18, 34, 50, 101, 152"):
        config.load(None, ["model.depth=26"])


def test_head_bias_starts_a_fresh_head_and_leaves_a_loaded_one(tmp_path):
    assert torch.equal(build_resnet(18, 1, head_bias=0.75).fc.bias, torch.tensor([0.75]))
    regression = build_resnet(18, 1)
    path = tmp_path / "regression.pt"
    torch.save(regression.state_dict(), path)
    assert torch.equal(build_resnet(18, 1, weights=path, head_bias=0.75).fc.bias, regression.fc.bias)
    classifier = tmp_path / "classifier.pt"
    torch.save(build_resnet(18, 5).state_dict(), classifier)  # another head: the backbone only
    assert torch.equal(build_resnet(18, 1, weights=classifier, head_bias=0.75).fc.bias, torch.tensor([0.75]))


def test_a_backbone_file_loads_strictly_with_only_its_missing_classifier_fresh(tmp_path, caplog):
    """pretrain's backbone.pt ({"model": weights without fc.*, "initialisation", "pretraining"}) loads every
    backbone weight and statistic exactly, the head stays the fresh one the seed gives; a backbone missing anything
    else, or holding an extra key, is one line naming the counts and the first keys; a wrong depth stays one line."""
    import logging

    from dr_resnet.model.resnet import WeightsMismatchError

    torch.manual_seed(1)
    source = build_resnet(18)
    with torch.no_grad():  # statistics that a fresh model does not have, so that loading them shows
        source.bn1.running_mean.uniform_()
    backbone = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    path = tmp_path / "backbone.pt"
    record = {"initialisation": "ssl", "method": "byol", "epochs": 2}
    torch.save({"model": backbone, "initialisation": "ssl", "pretraining": record}, path)
    path.with_suffix(".json").write_text(json.dumps(record))  # the record pretrain writes beside it
    torch.manual_seed(7)
    fresh = build_resnet(18, head_bias=0.25)
    torch.manual_seed(7)
    with caplog.at_level(logging.INFO, logger="dr_resnet.model.resnet"):
        model = build_resnet(18, weights=path, head_bias=0.25)
    for key, value in backbone.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert torch.equal(model.fc.weight, fresh.fc.weight) and torch.equal(model.fc.bias, torch.full((5,), 0.25))
    assert f"{path}: a backbone of initialisation ssl (method byol, epochs 2)" in caplog.text

    lacking = dict(backbone)
    del lacking["layer2.1.bn2.running_var"]
    torch.save({"model": lacking, "initialisation": "ssl"}, tmp_path / "lacking.pt")
    (tmp_path / "lacking.json").write_text(json.dumps(record))
    with pytest.raises(WeightsMismatchError) as refused:
        build_resnet(18, weights=tmp_path / "lacking.pt")
    assert str(refused.value) == (f"weights from {tmp_path / 'lacking.pt'} do not fit ResNet18: besides fc.weight, fc.bias, "
                                  "1 key(s) missing (first ['layer2.1.bn2.running_var']), 0 unexpected (first [])")
    extra = {**backbone, "projector.0.weight": torch.zeros(3)}  # a head of pretraining left in
    torch.save({"model": extra, "initialisation": "ssl"}, tmp_path / "extra.pt")
    (tmp_path / "extra.json").write_text(json.dumps(record))
    with pytest.raises(WeightsMismatchError, match=r"besides fc.weight, fc.bias, 0 key\(s\) missing \(first \[\]\), "
                                                   r"1 unexpected \(first \['projector.0.weight'\]\)$"):
        build_resnet(18, weights=tmp_path / "extra.pt")
    torch.save({"model": {k: v for k, v in build_resnet(50).state_dict().items() if not k.startswith("fc.")},
                "initialisation": "ssl"}, tmp_path / "r50.pt")
    (tmp_path / "r50.json").write_text(json.dumps(record))
    with pytest.raises(WeightsMismatchError) as deeper:
        build_resnet(18, weights=tmp_path / "r50.pt")
    assert "\n" not in str(deeper.value) and "holds ResNet50 weights; model.depth=18 builds a ResNet18" in str(deeper.value)
