"""Where the model looked: Grad-CAM on the last stage (layer4) for the predicted grade, by Captum's
LayerGradCam (PyTorch's own attribution library: it works on any nn.Module, the hand-written ResNets
included, with this torch), the heat map laid over the photo, and how much of a map's mass falls on
lesions (the synthetic generator's masks).

What a map is computed for: a classification head's predicted grade (its logit); a regression head's
score; an ordinal head's "grade > g - 1" output for a predicted grade g >= 1 and "grade > 0" for grade 0
(where the model looked for any retinopathy).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from dr_resnet.errors import UserError
from dr_resnet.registry import HEAD_SPECS

CAM_LAYER = "layer4"
OVERLAY_ALPHA = 0.45  # the heat map's weight where it is hottest
# captum is an extra: only the heat maps need it
CAM_EXTRA = "pip install -e '.[cam]' in a clone (pip install 'dr-resnet[cam]' where it was installed by name)"


class HeatMapsUnavailableError(UserError, ImportError):
    """Heat maps were asked for (predict --cam, report --gallery) where captum is not installed."""


def require_captum() -> None:
    """Raise HeatMapsUnavailableError, naming the extra to install, unless captum imports: called before any
    work that ends in heat maps, so that a run of predict or the report fails at once, not after grading."""
    try:
        import captum.attr  # noqa: F401
    except ImportError as exc:
        raise HeatMapsUnavailableError(f"heat maps need captum, which does not import here ({exc}): {CAM_EXTRA}") from None


def cam_targets(head_kind: str, grades: Tensor) -> Tensor | int:
    """The output each image's map explains (see the module's docstring)."""
    target = HEAD_SPECS[head_kind].cam_target
    if target == "score":
        return 0
    if target == "above previous":
        return (grades - 1).clamp(min=0)
    return grades


def grad_cam(network: nn.Module, inputs: Tensor, targets: Tensor | int, layer: str = CAM_LAYER) -> Tensor:
    """(N, H, W) maps in [0, 1] (each divided by its maximum; all zero where nothing speaks for the
    target) at the inputs' size, from the normalised float `inputs`; `layer`: the stage explained. Only the
    layer's output needs a gradient: the parameters are frozen meanwhile, so autograd keeps no graph for
    them (ResNet50 at 512 px in a batch would otherwise hold every layer's activations, as training does)."""
    require_captum()
    from captum.attr import LayerAttribution, LayerGradCam

    trainable = [p for p in network.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        with torch.enable_grad():
            attribution = LayerGradCam(network, getattr(network, layer)).attribute(
                inputs.float(), target=targets, relu_attributions=True)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    maps = LayerAttribution.interpolate(attribution.detach().float(), tuple(inputs.shape[-2:]),
                                        interpolate_mode="bilinear").squeeze(1).clamp(min=0)
    peak = maps.flatten(1).amax(dim=1).clamp(min=1e-12).view(-1, 1, 1)
    return maps / peak


def overlay(image: Tensor, heat: Tensor) -> Image.Image:
    """The uint8 (3, S, S) image with the (S, S) map in [0, 1] laid over it (jet colours; cold parts
    leave the photo nearly as it is)."""
    from matplotlib import colormaps

    photo = image.permute(1, 2, 0).cpu().numpy().astype(np.float32)
    heat = heat.cpu().numpy()
    colours = colormaps["jet"](heat)[..., :3] * 255
    weight = (OVERLAY_ALPHA * np.clip(heat * 1.5, 0, 1))[..., None]
    return Image.fromarray(np.clip((1 - weight) * photo + weight * colours, 0, 255).round().astype(np.uint8))


def lesion_scores(heat: np.ndarray, mask: np.ndarray, tolerance: int = 0) -> dict:
    """How a map meets a lesion mask (both (S, S); mask true on lesions): the share of the map's mass on
    lesions, the share of the image they cover (what a map spread at random would put there), their
    ratio (energy ratio: 1 is chance), and whether the map's peak is on a lesion (pointing game; the
    mask grown by `tolerance` pixels, whose area is the pointing game's chance rate)."""
    mask = mask.astype(bool)
    total = float(heat.sum())
    inside = float(heat[mask].sum()) / total if total > 0 else 0.0
    area = float(mask.mean())
    grown = _grow(mask, tolerance)
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return {"mass_on_lesions": inside, "lesion_area": area, "energy_ratio": inside / area if area > 0 else float("nan"),
            "pointing_hit": bool(grown[peak]) if total > 0 else False, "pointing_chance": float(grown.mean())}


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """The mask dilated by a square of `pixels` on each side (max-pooling)."""
    if pixels <= 0:
        return mask
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (nn.functional.max_pool2d(t, 2 * pixels + 1, stride=1, padding=pixels)[0, 0] > 0).numpy()
