"""dr_resnet.pretraining's method: BYOL's loss against the paper's definition, the target network as the
training's weight average (closed form, no gradient), the decay schedule, the collapse measure; and the
fundus views (black surround kept black, crops inside the retina, augment's affine convention, reproducible)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dr_resnet.data.augment import apply_params, normalize
from dr_resnet.data.synthetic import render_fundus
from dr_resnet.errors import UserError
from dr_resnet.model.resnet import build_resnet
from dr_resnet.pretraining.byol import (
    CollapseError,
    OnlineNetwork,
    Projection,
    byol_loss,
    drop_classifier,
    output_spread,
    raise_if_collapsed,
    symmetric_loss,
    target_decay,
    target_network,
)
from dr_resnet.pretraining.views import FundusViews, retina_box, retina_mask

BLACK = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8))[0, :, 0, 0]  # the normalised value of black


# --- BYOL --------------------------------------------------------------------------------------------------

def paper_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Grill et al. 2020, eq. 2, in float64: || p/||p|| - z/||z|| ||^2 per sample, mean over the batch."""
    p, z = p.double(), z.double()
    return ((p / p.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)) ** 2).sum(dim=1).mean()


def test_the_loss_is_the_papers_normalised_mse_and_symmetrised_over_both_view_orders():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(16, 32, generator=g) * 3 for _ in range(4))
    torch.testing.assert_close(byol_loss(p1, z2).double(), paper_loss(p1, z2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(symmetric_loss((p1, p2), (z1, z2)).double(), paper_loss(p1, z2) + paper_loss(p2, z1),
                               rtol=1e-6, atol=1e-6)
    # Its range: 0 when the prediction points as the target does (whatever the lengths), 4 when opposed.
    assert byol_loss(z1 * 5, z1).item() == pytest.approx(0, abs=1e-6)
    assert byol_loss(-z1, z1).item() == pytest.approx(4, abs=1e-6)
    with pytest.raises(ValueError, match=r"\(16, 32\) and \(16, 31\)"):
        byol_loss(p1, z1[:, :31])


def test_under_autocast_the_loss_is_float32():
    p, z = torch.randn(8, 16).bfloat16(), torch.randn(8, 16).bfloat16()
    assert byol_loss(p, z).dtype == torch.float32
    torch.testing.assert_close(byol_loss(p, z).double(), paper_loss(p.float(), z.float()), rtol=1e-5, atol=1e-5)


def tiny_online(in_dim: int = 6, hidden: int = 12, out: int = 4) -> OnlineNetwork:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, in_dim), nn.BatchNorm1d(in_dim), nn.ReLU())
    return OnlineNetwork(backbone, Projection(in_dim, hidden, out), Projection(out, hidden, out))


def test_no_gradient_reaches_the_target_only_the_online_network_learns():
    online = tiny_online()
    target = target_network(online, 0.99)
    x1, x2 = torch.randn(8, 2, 3, 3), torch.randn(8, 2, 3, 3)
    out = online(x1, x2)
    targets = (target.module(x1), target.module(x2))  # no torch.no_grad: the loss itself must detach
    symmetric_loss(out.predictions, targets).backward()
    assert all(p.grad is None and not p.requires_grad for p in target.module.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in online.parameters())
    # A target tensor that does take gradients still gets none through the loss.
    z = torch.randn(8, 4, requires_grad=True)
    p = torch.randn(8, 4, requires_grad=True)
    byol_loss(p, z).backward()
    assert z.grad is None and p.grad is not None


def test_the_target_averages_backbone_and_projector_not_the_predictor_in_closed_form():
    """BYOL's target after k steps with decay tau: tau^k theta_0 + sum_j (1 - tau) tau^(k - j) theta_j, for
    the weights and BatchNorm's running statistics; BatchNorm's count is copied."""
    online, tau, k = tiny_online(), 0.8, 5
    target = target_network(online, tau)
    keys = list(online.encoder.state_dict())
    assert list(target.module.state_dict()) == keys and not any(key.startswith("predictor") for key in keys)
    history = [{key: v.clone() for key, v in online.encoder.state_dict().items()}]
    optimizer = torch.optim.SGD(online.parameters(), lr=0.5)
    for step in range(k):
        x1, x2 = torch.randn(8, 2, 3, 3), torch.randn(8, 2, 3, 3)
        with torch.no_grad():
            targets = (target.module(x1), target.module(x2))
        symmetric_loss(online(x1, x2).predictions, targets).backward()
        optimizer.step()
        optimizer.zero_grad()
        target.update(online.encoder)
        history.append({key: v.clone() for key, v in online.encoder.state_dict().items()})
    averaged = target.module.state_dict()
    for key in keys:
        if not averaged[key].is_floating_point():
            assert torch.equal(averaged[key], history[-1][key]), key
            continue
        expected = tau**k * history[0][key].double()
        for j in range(1, k + 1):
            expected += (1 - tau) * tau ** (k - j) * history[j][key].double()
        torch.testing.assert_close(averaged[key].double(), expected, rtol=1e-5, atol=1e-6, msg=key)
        assert not torch.equal(history[0][key], history[-1][key]) or "running" in key  # the weights moved


def test_a_resnet_backbone_gives_the_backbone_files_keys_and_features_to_the_projector():
    backbone = drop_classifier(build_resnet(18, weights=None))
    online = OnlineNetwork(backbone, Projection(512, 64, 16), Projection(16, 64, 16))
    assert not any(key.startswith("fc.") for key in online.backbone.state_dict())
    assert set(online.backbone.state_dict()) == {k for k in build_resnet(18).state_dict() if not k.startswith("fc.")}
    out = online(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))
    assert [t.shape for t in (*out.projections, *out.predictions)] == [torch.Size([2, 16])] * 4
    with pytest.raises(ValueError, match="no classifier"):
        drop_classifier(nn.Linear(2, 2))


def test_projection_is_byols_mlp_with_plain_batchnorm():
    head = Projection(8, 32, 4)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[3].out_features) == (8, 32, 4)
    with pytest.raises(ValueError, match="hidden_dim"):
        Projection(8, 0, 4)


def test_target_decay_is_byols_cosine_from_base_to_one():
    total, base = 1000, 0.99
    values = [target_decay(step, total, base) for step in range(total + 1)]
    assert values[0] == base and values[-1] == 1.0
    assert values[total // 2] == pytest.approx((1 + base) / 2)
    assert all(a < b for a, b in zip(values, values[1:]))  # strictly rising
    for bad in (-1, total + 1):
        with pytest.raises(ValueError, match="outside"):
            target_decay(bad, total, base)


def test_output_spread_is_one_over_root_d_when_spread_and_zero_when_collapsed():
    d, n = 256, 512
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(0)) * 7 + 3 * torch.randn(1, d)
    spread = output_spread(z)
    assert isinstance(spread, torch.Tensor) and spread.ndim == 0 and spread.device == z.device
    assert abs(spread.item() * math.sqrt(d) - 1) < 0.1
    collapsed = output_spread(torch.randn(1, d).expand(n, d) * 5)
    assert collapsed.item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        output_spread(torch.randn(1, d))


def test_collapse_stops_with_one_line():
    raise_if_collapsed(1 / math.sqrt(256), 256, 0.1, step=10)  # healthy: nothing
    with pytest.raises(CollapseError, match=r"collapsed at step 7: .*sqrt\(256\) = 0\.0160.*collapse_below=0\.1") as e:
        raise_if_collapsed(0.001, 256, 0.1, step=7)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    with pytest.raises(CollapseError):
        raise_if_collapsed(float("nan"), 256, 0.1, step=7)


# --- views -------------------------------------------------------------------------------------------------

def disc_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Textured discs (random centres and radii, some clipped at top and bottom) on black."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = []
    for _ in range(n):
        cx, cy = (size / 2 + (torch.rand(2, generator=g) - 0.5) * size * 0.2).tolist()
        radius = size * (0.35 + 0.2 * torch.rand(1, generator=g).item())
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2)
        texture = torch.randint(40, 256, (3, size, size), generator=g, dtype=torch.uint8)
        images.append(texture * disc)
    return torch.stack(images)


def synthetic_fundus(n: int, size: int) -> torch.Tensor:
    """dr_resnet.data.synthetic's photos, centred in a black square (as preprocessing does) at size px."""
    out = []
    for i in range(n):
        photo = render_fundus(grade=i % 5, seed=1, split="train", index=i, size=size)
        side = max(photo.size)
        square = Image.new("RGB", (side, side))
        square.paste(photo, ((side - photo.width) // 2, (side - photo.height) // 2))
        out.append(torch.from_numpy(np.array(square.resize((size, size), Image.BILINEAR))).permute(2, 0, 1))
    return torch.stack(out).contiguous()


@pytest.mark.parametrize("make", [disc_images, synthetic_fundus])
def test_the_surround_is_exactly_black_in_both_views(make):
    images = make(6, 48)
    views = FundusViews(48, crop_scale=0.35, max_rotation=180, flips=True, colour=0.4)  # contrast down lifts black
    mask = retina_mask(images)
    box = retina_box(mask)
    g = torch.Generator().manual_seed(5)
    pair = views.pair(images, torch.Generator().manual_seed(5))
    for view in pair:
        again, view_mask = views.render(images, mask, views.sample(box, g))
        assert torch.equal(view, again)  # pair is sample + render, view 1's draws then view 2's
        outside = (view_mask == 0).expand_as(view)
        assert outside.any() and (~outside).any()
        black = BLACK.view(1, 3, 1, 1).expand_as(view)
        assert torch.equal(view[outside], black[outside])
        # The retina is not black: the mask followed the photo (its non-zero pixels hold the colours).
        assert (view[~outside] != black[~outside]).float().mean() > 0.9


def test_views_differ_are_reproducible_and_have_the_asked_shape_dtype_device_and_layout():
    images = synthetic_fundus(4, 40)
    views = FundusViews(32, channels_last=True)
    a1, a2 = views.pair(images, torch.Generator().manual_seed(3))
    b1, b2 = views.pair(images, torch.Generator().manual_seed(3))
    c1, _ = views.pair(images, torch.Generator().manual_seed(4))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2) and not torch.equal(a1, c1)
    for view in (a1, a2):
        assert view.shape == (4, 3, 32, 32) and view.dtype == torch.float32 and view.device == images.device
        assert view.is_contiguous(memory_format=torch.channels_last)
    assert FundusViews(32).pair(images, torch.Generator())[0].is_contiguous()
    with pytest.raises(ValueError, match=r"square uint8 photos .*float32 \(4, 3, 40, 40\)"):
        views.pair(images.float(), torch.Generator())
    with pytest.raises(ValueError, match="crop_scale"):
        FundusViews(32, crop_scale=0)


def test_a_whole_box_crop_keeps_augments_rotation_and_flip_convention():
    """With crop_scale 1 on a retina filling the image, the geometry is data.augment's rotation + flips."""
    images = torch.randint(20, 256, (4, 3, 24, 24), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    views = FundusViews(24, crop_scale=1.0, max_rotation=30, flips=True, colour=0.0)
    mask = retina_mask(images)
    params = views.sample(retina_box(mask), torch.Generator().manual_seed(1))
    view, view_mask = views.render(images, mask, params)
    assert torch.allclose(params.matrix[:, :, 2], torch.zeros(4, 2), atol=1e-6)  # centred: the box is the image
    assert params.turn.hflip.any() and params.turn.angles.abs().max() > 5
    expected = apply_params(images.float(), params.turn)
    torch.testing.assert_close(view, normalize(expected * view_mask), atol=1e-3, rtol=0)


def test_a_crop_is_a_square_inside_the_retinas_box_with_its_area_share():
    size = 64
    images = torch.zeros(200, 3, size, size, dtype=torch.uint8)
    images[:, :, 8:40, 16:56] = 200  # the retina's box: rows 8..39, columns 16..55 (32 x 40 pixels)
    views = FundusViews(size, crop_scale=0.5, max_rotation=0, flips=False, colour=0.0)
    box = retina_box(retina_mask(images))
    assert [edge[0].item() * size / 2 + size / 2 for edge in box] == [16, 8, 56, 40]
    m = views.sample(box, torch.Generator().manual_seed(0)).matrix
    half = m[:, 0, 0]  # no rotation or flips: the crop's half side, the same on both axes (a square)
    assert torch.equal(m[:, 1, 1], half) and (m[:, 0, 1] == 0).all() and (m[:, 1, 0] == 0).all()
    share = (2 * half) ** 2 / ((40 / 32) * (32 / 32))  # box area in normalised units: 1.25 x 1.0
    assert share.min() >= 0.5 - 1e-6 and share.max() <= (32 / 40) + 1e-6  # the largest square fits the height
    assert share.max() > 0.75  # draws reach the box's limit
    left, top = m[:, 0, 2] - half, m[:, 1, 2] - half
    right, bottom = m[:, 0, 2] + half, m[:, 1, 2] + half
    assert (left >= -0.5 - 1e-6).all() and (right <= 0.75 + 1e-6).all()
    assert (top >= -0.75 - 1e-6).all() and (bottom <= 0.25 + 1e-6).all()


def test_a_full_crop_of_a_square_box_is_the_box_resized():
    images = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    images[0, :, 16:48, 16:48] = torch.randint(30, 256, (3, 32, 32), generator=torch.Generator().manual_seed(2),
                                               dtype=torch.uint8)
    views = FundusViews(64, crop_scale=1.0, max_rotation=0, flips=False, colour=0.0)
    view, _ = views.pair(images, torch.Generator().manual_seed(0))
    box = F.interpolate(images[:, :, 16:48, 16:48].float(), size=64, mode="bilinear", align_corners=False)
    # The edge pixels blend with the black beyond the box (and the mask's edge); the rest is the box, 2x.
    torch.testing.assert_close(view[..., 1:-1, 1:-1], normalize(box)[..., 1:-1, 1:-1], atol=1e-3, rtol=0)


def test_brightness_is_a_per_sample_factor_within_the_colour_strength():
    """On a flat grey retina filling the image, contrast (about its own mean) and saturation (towards its own
    grey) change nothing: each view is the photo times its brightness factor, drawn in [1 - c, 1 + c]."""
    images = torch.full((64, 3, 16, 16), 100, dtype=torch.uint8)
    views = FundusViews(16, crop_scale=1.0, max_rotation=0, flips=False, colour=0.3)
    mask = retina_mask(images)
    params = views.sample(retina_box(mask), torch.Generator().manual_seed(0))
    view, _ = views.render(images, mask, params)
    factor = params.brightness
    assert factor.min() >= 0.7 and factor.max() <= 1.3 and factor.max() - factor.min() > 0.4
    assert not torch.equal(params.contrast, torch.ones(64)) and params.saturation.sub(1).abs().max() <= 0.15
    expected = normalize((100 * factor).view(64, 1, 1, 1).expand(64, 3, 16, 16))
    torch.testing.assert_close(view, expected, atol=1e-4, rtol=0)


def test_an_image_without_retina_takes_the_whole_image_as_its_box():
    box = retina_box(retina_mask(torch.zeros(2, 3, 16, 16, dtype=torch.uint8)))
    assert [edge.tolist() for edge in box] == [[-1.0, -1.0], [-1.0, -1.0], [1.0, 1.0], [1.0, 1.0]]


@pytest.mark.gpu
def test_views_and_spread_on_cuda_stay_on_the_device_and_never_wait_for_it():
    images = synthetic_fundus(4, 40).cuda()
    views = FundusViews(32, channels_last=True)
    views.pair(images, torch.Generator(device="cuda").manual_seed(0))  # the first call copies its constants over
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a host wait raises
    try:
        first, second = views.pair(images, torch.Generator(device="cuda").manual_seed(0))
        spread = output_spread(first.flatten(1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert first.device == second.device == spread.device == images.device
    assert first.shape == (4, 3, 32, 32) and first.is_contiguous(memory_format=torch.channels_last)
    outside = views.render(images, retina_mask(images), views.sample(retina_box(retina_mask(images)),
                           torch.Generator(device="cuda").manual_seed(1)))[1] == 0
    assert outside.any()
