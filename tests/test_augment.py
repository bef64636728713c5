import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from dr_resnet.data.augment import AugmentParams, DeviceAugment, apply_params, epoch_generator, normalize, sample_params
from dr_resnet.data.dataset import evaluation_transform


def test_angles_and_flips_follow_torchvisions_distribution():
    n = 4000
    ours = sample_params(n, 20.0, True, torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    rotation = v2.RandomRotation(20)
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    theirs = torch.tensor([rotation.make_params([image])["angle"] for _ in range(n)])
    assert ours.angles.min() >= -20 and ours.angles.max() <= 20
    assert stats.ks_2samp(ours.angles.numpy(), theirs.numpy()).pvalue > 0.01
    assert stats.kstest(ours.angles.numpy(), stats.uniform(-20, 40).cdf).pvalue > 0.01
    for flips in (ours.hflip, ours.vflip):
        assert stats.binomtest(int(flips.sum()), n, 0.5).pvalue > 0.01
    # Independent draws: all four flip combinations are equally common.
    combos = np.bincount((ours.hflip.long() * 2 + ours.vflip.long()).numpy(), minlength=4)
    assert stats.chisquare(combos).pvalue > 0.01


@pytest.mark.parametrize("angle,h,v", [(15.0, False, False), (-20.0, True, False), (7.5, False, True), (-3.0, True, True)])
def test_each_sample_transforms_as_torchvision_would(angle, h, v):
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8)
    params = AugmentParams(torch.tensor([angle, -angle]), torch.tensor([h, not h]), torch.tensor([v, v]))
    out = apply_params(batch.float(), params)
    for i in range(2):
        expected = TF.rotate(batch[i].float(), float(params.angles[i]), interpolation=v2.InterpolationMode.BILINEAR)
        expected = TF.horizontal_flip(expected) if params.hflip[i] else expected
        expected = TF.vertical_flip(expected) if params.vflip[i] else expected
        torch.testing.assert_close(out[i], expected, atol=5e-3, rtol=0)  # of 255


def test_evaluation_is_exactly_the_per_sample_normalisation():
    batch = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    expected = torch.stack([evaluation_transform()(img) for img in batch])
    torch.testing.assert_close(DeviceAugment().eval(batch), expected)


def test_rotated_in_corners_are_black_and_streams_are_reproducible():
    batch = torch.full((4, 3, 32, 32), 200, dtype=torch.uint8)
    augment = DeviceAugment(max_rotation=20, flips=True)
    a = augment.train(batch, epoch_generator(0, 3, 1))
    b = augment.train(batch, epoch_generator(0, 3, 1))
    c = augment.train(batch, epoch_generator(0, 4, 1))
    d = augment.train(batch, epoch_generator(0, 3, 0))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    black = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8))[0, :, 0, 0]
    corners = a[:, :, 0, 0]
    # A corner pixel is wholly rotated in from outside from about 5 degrees on (below, bilinear blends it).
    rotated = sample_params(4, 20, True, epoch_generator(0, 3, 1)).angles.abs() > 5
    assert rotated.any()
    torch.testing.assert_close(corners[rotated], black.expand(int(rotated.sum()), 3), atol=0.3, rtol=0)


def test_no_geometry_means_normalisation_only():
    batch = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    out = DeviceAugment(max_rotation=0, flips=False).train(batch, torch.Generator())
    torch.testing.assert_close(out, normalize(batch))
