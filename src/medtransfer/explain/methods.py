"""Heatmaps at the resolution users train at: CAMs on a chosen backbone stage, a multi-stage fusion, occlusion.

The last feature map is 2x2 at 64 px, where a peak says almost nothing about *where* a finding is, so the CAM
methods take any stage timm's ``feature_info`` names (``blocks.2``, stride 8, is 8x8 at 64 px):

* ``gradcam``: Grad-CAM (Selvaraju et al. 2017) on one stage, with Captum's ``LayerGradCam``.
* ``layercam``: LayerCAM (Jiang et al. 2021): ``relu(sum_c relu(dS/dA_c) * A_c)``, which keeps shallow stages
  sharp where Grad-CAM's spatial mean blurs.
* ``fusion``: the geometric mean of LayerCAM on a stage and every deeper one: hot only where coarse and fine agree.
* ``occlusion``: Captum's ``Occlusion`` with a patch of 1/8 of the side (225 forward passes at any size); the
  default, as the most robust in the planted-lesion measurements (docs/heatmaps.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam, Occlusion
from torch import Tensor, nn
from torchvision import ops

from medtransfer.errors import MedtransferError
from medtransfer.explain.choices import DEFAULT_LAYERS, DEFAULT_METHOD, METHODS, Method

__all__ = [
    "DEFAULT_LAYERS",
    "DEFAULT_METHOD",
    "METHODS",
    "Method",
    "Target",
    "box_iou",
    "explain",
    "map_box",
    "map_peak",
    "pointing_hit",
    "resolve_layer",
]

Layer = int | str | None
Target = int | Sequence[int] | Tensor | None


def _target_index(logits: Tensor, task: str, target: Target) -> Tensor:
    """Per image, the output column whose score is explained: the binary logit, the given class/label, or
    the predicted class (multiclass) / the highest-scoring label (multilabel)."""
    n = logits.shape[0]
    if task == "binary":
        if target is not None and not bool((torch.as_tensor(target) == 1).all()):
            raise ValueError(f"Expected argument `target` to be None or 1 for a binary task, but got {target}")
        return torch.zeros(n, dtype=torch.long, device=logits.device)
    if target is None:
        return logits.argmax(dim=1)
    index = torch.as_tensor(target, dtype=torch.long, device=logits.device).reshape(-1)
    if index.numel() not in (1, n):
        raise ValueError(f"Expected argument `target` to be one index or {n} (one per image), but got {target}")
    index = index.expand(n).clone()
    if bool(((index < 0) | (index >= logits.shape[1])).any()):
        raise ValueError(f"Expected argument `target` to be in [0, {logits.shape[1]}), but got {target}")
    return index


def resolve_layer(backbone: nn.Module, layer: int | str) -> tuple[str, nn.Module]:
    """The backbone's submodule named by ``layer``: an index into timm's ``feature_info`` (0 = the first
    stage, -1 = the last), or a module name (``blocks.2``, ``layer3``; ``feature_info`` lists the stages)."""
    info = list(getattr(backbone, "feature_info", None) or [])
    stages = [entry["module"] for entry in info]
    if isinstance(layer, int) or (isinstance(layer, str) and layer.lstrip("-").isdigit()):
        index = int(layer)
        if not stages:
            raise MedtransferError(f"{type(backbone).__name__} has no feature_info; give --explain_layer by name")
        if not -len(stages) <= index < len(stages):
            listed = ", ".join(f"{i}: {e['module']} (stride {e['reduction']})" for i, e in enumerate(info))
            raise MedtransferError(
                f"--explain_layer {index} is out of range: {type(backbone).__name__} has {len(stages)} stages "
                f"({listed})"
            )
        layer = stages[index]
    modules = dict(backbone.named_modules())
    if layer not in modules or layer == "":
        hint = f"; its stages: {', '.join(stages)}" if stages else ""
        raise MedtransferError(f"--explain_layer {layer!r}: {type(backbone).__name__} has no such module{hint}")
    return layer, modules[layer]


def _stage_modules(backbone: nn.Module, layer: Layer, method: str) -> list[nn.Module]:
    first = DEFAULT_LAYERS[method] if layer is None else layer
    name, module = resolve_layer(backbone, first)
    if method != "fusion":
        return [module]
    stages = [entry["module"] for entry in getattr(backbone, "feature_info", None) or []]
    deeper = stages[stages.index(name) + 1 :] if name in stages else []
    return [module, *(resolve_layer(backbone, stage)[1] for stage in deeper)]


def _scaled(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """``(N, 1, h, w)`` non-negative maps -> ``(N, H, W)``, bilinear, each scaled to a maximum of 1."""
    maps = LayerAttribution.interpolate(maps.float(), size, interpolate_mode="bilinear").clamp_min(0)[:, 0]
    peak = maps.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > 1e-12, maps / peak.clamp_min(1e-12), torch.zeros_like(maps))


def _cam(weighted: Tensor) -> Tensor:
    """``relu(sum_c weighted_c)`` of a stage's channel-weighted ``(N, C, h, w)`` output; token stages (a
    transformer's ``(N, L, C)``) have no map and are refused."""
    if weighted.ndim != 4:
        raise MedtransferError(
            f"CAM methods need a convolutional backbone whose stages are (N, C, h, w), but this stage gives shape "
            f"{tuple(weighted.shape)}; use --explain_method occlusion"
        )
    return torch.relu(weighted.sum(dim=1, keepdim=True))


def _layer_cams(forward: Callable[[Tensor], Tensor], modules: list[nn.Module], x: Tensor, index: Tensor) -> list:
    """LayerCAM of each module's output, from one forward and one backward pass."""
    outputs: list[Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in modules]
    try:
        logits = forward(x.requires_grad_(True))
    finally:
        for handle in handles:
            handle.remove()
    activations = [out[0] if isinstance(out, tuple) else out for out in outputs[: len(modules)]]
    score = logits.gather(1, index[:, None]).sum()  # images are independent in eval mode
    gradients = torch.autograd.grad(score, activations)
    return [_cam(torch.relu(g) * a.detach()) for g, a in zip(gradients, activations, strict=True)]


def explain(
    model: nn.Module,
    images: Tensor,
    target: Target = None,
    method: Method = DEFAULT_METHOD,
    layer: Layer = None,
    occlusion_window: int | None = None,
) -> Tensor:
    """``(N, H, W)`` heatmaps of the logit of a ``ClassifierModule`` or ``ProbabilityModel`` for normalised
    ``images``, each scaled to a maximum of 1 (all zero without positive evidence); modules' modes are restored.

    ``target``: a class/label index for all images or one per image, ``None`` for the top-scoring one (binary:
    the positive logit). ``layer``: a ``feature_info`` index or module name (default :data:`DEFAULT_LAYERS`;
    ignored by occlusion). ``occlusion_window``: the patch side (default 1/8 of the shorter side).
    """
    if method not in METHODS:
        raise ValueError(f"Expected argument `method` to be one of {METHODS}, but got {method!r}")
    task = model.task if isinstance(getattr(model, "task", None), str) else model.hparams.task
    size = tuple(images.shape[-2:])
    modes = {module: module.training for module in model.modules()}
    model.eval()

    def forward(x: Tensor) -> Tensor:
        return model.head(model.backbone(x))

    try:
        with torch.inference_mode(False), torch.enable_grad():
            device = next(model.parameters()).device
            x = images.detach().clone().to(device).float()
            with torch.no_grad():
                index = _target_index(forward(x), task, target)
            if method == "occlusion":
                side = occlusion_window or max(2, min(size) // 8)
                stride = max(1, side // 2)
                with torch.no_grad():  # forward passes only
                    attributions = Occlusion(forward).attribute(
                        x,
                        sliding_window_shapes=(x.shape[1], side, side),
                        strides=(x.shape[1], stride, stride),
                        baselines=0.0,  # the mean image: inputs are normalised
                        target=index,
                        perturbations_per_eval=16,
                    )
                maps = _scaled(attributions.sum(dim=1, keepdim=True), size)
            elif method == "gradcam":
                (module,) = _stage_modules(model.backbone, layer, method)
                weighted = LayerGradCam(forward, module).attribute(x, target=index, attr_dim_summation=False)
                maps = _scaled(_cam(weighted.detach()), size)
            else:
                modules = _stage_modules(model.backbone, layer, method)
                cams = [_scaled(cam, size) for cam in _layer_cams(forward, modules, x, index)]
                maps = cams[0] if method == "layercam" else torch.stack(cams).prod(dim=0) ** (1 / len(cams))
                maps = _scaled(maps[:, None], size)
        return maps.detach().clamp(0, 1).to(images.device)
    finally:
        for module, training in modes.items():
            module.training = training


# ------------------------------------------------------------------------------------------- maps as data
def map_peak(heatmap: Tensor | np.ndarray) -> tuple[float, float, float]:
    """``(x, y, value)`` of a ``(H, W)`` map's maximum, in pixels; ties (a plateau) give their centroid."""
    heat = torch.as_tensor(np.asarray(heatmap, dtype=np.float32))
    value = float(heat.max())
    ys, xs = torch.nonzero(heat >= value - 1e-6, as_tuple=True)
    return float(xs.float().mean()), float(ys.float().mean()), value


def map_box(heatmap: Tensor | np.ndarray, threshold: float = 0.5) -> tuple[float, float, float, float] | None:
    """``(x_min, y_min, x_max, y_max)`` of the connected region of ``map >= threshold * max`` that holds the
    peak (pixel edges, as box CSVs count them), or ``None`` for an all-zero map."""
    from scipy import ndimage

    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.max() <= 0:
        return None
    regions, _ = ndimage.label(heat >= threshold * heat.max())
    x, y, _ = map_peak(heat)
    peak_region = regions[round(y), round(x)] or regions[np.unravel_index(heat.argmax(), heat.shape)]
    ys, xs = np.nonzero(regions == peak_region)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def pointing_hit(heatmap: Tensor | np.ndarray, box: Sequence[float], tolerance: float = 0.0) -> bool:
    """The pointing game (Zhang et al. 2016): is the map's peak inside ``box`` (``x_min, y_min, x_max, y_max``
    in the map's pixels), widened by ``tolerance`` pixels? An all-zero map points nowhere: a miss."""
    x, y, value = map_peak(heatmap)
    x_min, y_min, x_max, y_max = box
    inside = x_min - tolerance <= x + 0.5 <= x_max + tolerance and y_min - tolerance <= y + 0.5 <= y_max + tolerance
    return bool(value > 0 and inside)


def box_iou(a: Sequence[float] | None, b: Sequence[float]) -> float:
    """torchvision's intersection over union of two ``x_min, y_min, x_max, y_max`` boxes (0 when ``a`` is ``None``)."""
    if a is None:
        return 0.0
    pair = torch.from_numpy(np.array([a, b], dtype=np.float64))
    return float(ops.box_iou(pair[:1], pair[1:])[0, 0].nan_to_num())
