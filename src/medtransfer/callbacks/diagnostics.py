"""Gradient norms per block and activation statistics per layer, sampled every ``every_n_steps`` and written
straight to the loggers (like ``LearningRateMonitor``); timm's coarse blocks keep about ten metrics per kind."""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import grad_norm
from timm.layers import activations as timm_activations
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from medtransfer.models.backbones import backbone_blocks

__all__ = ["ActivationStats", "GradientStats", "activation_layers", "parameter_blocks"]

_logger = logging.getLogger(__name__)

#: Activations whose output is exactly 0 for negative input: a unit can be "dead".
RELU_LIKE: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
#: Smooth (or leaky) activations: mean and std only.
SMOOTH: tuple[type[nn.Module], ...] = (
    nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish, nn.ELU, nn.LeakyReLU, nn.PReLU, nn.Tanh,
    timm_activations.Swish, timm_activations.GELU, timm_activations.GELUTanh, timm_activations.QuickGELU,
    timm_activations.HardSwish, timm_activations.Mish, timm_activations.HardMish, timm_activations.PReLU,
)  # fmt: skip


def _common_prefix(names: list[str]) -> str:
    """The dotted components all ``names`` share: ``["layer1.0.conv1", "layer1.1.bn2"]`` -> ``layer1``."""
    parts = [name.split(".") for name in names]
    shared = []
    for components in zip(*parts, strict=False):
        if len(set(components)) > 1:
            break
        shared.append(components[0])
    return ".".join(shared)


def _block_label(names: list[str], detailed: bool = False) -> str:
    """A name for a block of modules: their common prefix (``layer1``); without one, or when ``detailed``, the
    distinct modules below it joined by ``-`` (``conv_stem-bn1``; MLflow metric keys allow no ``+``)."""
    names = [name for name in names if name]
    common = _common_prefix(names)
    if common and not detailed:
        return common
    below: dict[str, list[str]] = {}
    for name in names:
        rest = name[len(common) :].lstrip(".")
        if rest:
            below.setdefault(rest.split(".")[0], []).append(rest)
    if len(below) <= 1:
        return common
    joined = "-".join(_common_prefix(group) for group in below.values())
    return f"{common}.{joined}" if common else joined


def _blocks(module: nn.Module) -> list[tuple[str, list[tuple[str, nn.Module]]]]:
    """``(block name, [(module name, module), ...])`` from input to output; every module in exactly one block.

    A ``.backbone`` is split into its coarse timm blocks (``backbone.layer1``), followed by the other top-level
    children (``head``). timm groups only modules with parameters; one without (an activation) joins the block
    of the module registered before it.
    """
    backbone = getattr(module, "backbone", None)
    others = [
        (name, list(child.named_modules(prefix=name)))
        for name, child in module.named_children()
        if child is not backbone or not isinstance(backbone, nn.Module)
    ]
    if not isinstance(backbone, nn.Module):
        return others
    groups = backbone_blocks(backbone)
    index = {id(child): i for i, group in enumerate(groups) for child in group}
    members: list[list[tuple[str, nn.Module]]] = [[] for _ in groups]
    current = 0
    for name, child in backbone.named_modules(prefix="backbone"):
        current = index.get(id(child), current)
        members[current].append((name, child))
    grouped = [[name.removeprefix("backbone.") for name, child in group if id(child) in index] for group in members]
    labels = [_block_label(names) for names in grouped]
    repeated = {label for label in labels if labels.count(label) > 1}  # e.g. DenseNet: all under `features`
    labels = [_block_label(names, detailed=label in repeated) for names, label in zip(grouped, labels, strict=True)]
    labels = [f"backbone.{label}" if label and label != "backbone" else "backbone" for label in labels]
    if len(set(labels)) < len(labels):
        labels = [f"{label}_{i}" for i, label in enumerate(labels)]
    return list(zip(labels, members, strict=True)) + others


def parameter_blocks(module: nn.Module) -> dict[str, list[str]]:
    """Parameter names of ``module`` grouped by block, input to output; blocks without parameters left out.

    >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    >>> parameter_blocks(net)
    {'0': ['0.weight', '0.bias'], '2': ['2.weight', '2.bias']}
    """
    groups: dict[str, list[str]] = {}
    for block, members in _blocks(module):
        names = [f"{prefix}.{name}" for prefix, child in members for name, _ in child.named_parameters(recurse=False)]
        if names:
            groups[block] = names
    return groups


def activation_layers(module: nn.Module, max_layers: int = 12) -> list[str]:
    """The last activation module of each block, input to output; at most ``max_layers``, evenly spaced."""
    if max_layers < 1:
        raise ValueError(f"Expected argument `max_layers` to be at least 1, but got {max_layers}")
    layers = []
    for _, members in _blocks(module):
        found = [name for name, child in members if isinstance(child, RELU_LIKE + SMOOTH)]
        if found:
            layers.append(found[-1])
    if len(layers) <= max_layers:
        return layers
    if max_layers == 1:
        return layers[-1:]
    step = (len(layers) - 1) / (max_layers - 1)
    return [layers[round(i * step)] for i in range(max_layers)]


def activation_stats(output: Tensor, relu_like: bool) -> dict[str, float]:
    """Mean and std of an activation output; for ReLU-like layers also ``dead_frac``, the share of units
    (channels or features) that are exactly 0 for the whole batch.

    >>> activation_stats(torch.tensor([[0.0, 1.0], [0.0, 3.0]]), relu_like=True)
    {'mean': 1.0, 'std': 1.4142135381698608, 'dead_frac': 0.5}
    """
    output = output.detach().float()
    stats = {"mean": float(output.mean()), "std": float(output.std()) if output.numel() > 1 else 0.0}
    if relu_like:
        units = output.transpose(0, 1).reshape(output.shape[1], -1) if output.ndim > 1 else output[None]
        stats["dead_frac"] = float((units == 0).all(dim=1).float().mean())
    return stats


def _log(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def _due(trainer: Trainer, every_n_steps: int | None) -> bool:
    """Whether this training step is sampled (the first one always is)."""
    return trainer.global_step % (every_n_steps or trainer.log_every_n_steps or 1) == 0


def _check_interval(every_n_steps: int | None) -> None:
    if every_n_steps is not None and every_n_steps < 1:
        raise ValueError(f"Expected argument `every_n_steps` to be None or at least 1, but got {every_n_steps}")


class GradientStats(Callback):
    """Log gradient norms every ``every_n_steps`` optimizer steps, after backward (and AMP unscaling).

    Metrics: ``diag/grad_norm/total`` and ``diag/grad_norm/<block>`` per backbone block and head; frozen
    blocks have no gradient and are not logged.

    Args:
        every_n_steps: interval in optimizer steps (the first is always sampled); ``None``: ``log_every_n_steps``.
        norm_type: the p of the p-norm (``2.0``; ``inf`` for the largest absolute gradient).
    """

    def __init__(self, every_n_steps: int | None = None, norm_type: float = 2.0) -> None:
        _check_interval(every_n_steps)
        if float(norm_type) <= 0:
            raise ValueError(f"Expected argument `norm_type` to be positive or 'inf', but got {norm_type}")
        self.every_n_steps = every_n_steps
        self.norm_type = float(norm_type)
        self._blocks: dict[str, list[str]] | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._blocks = None

    def norms(self, pl_module: nn.Module) -> dict[str, float]:
        """Total and per-block gradient norms of ``pl_module`` now (blocks without gradients left out)."""
        if self._blocks is None:
            self._blocks = parameter_blocks(pl_module)
        per_parameter = grad_norm(pl_module, self.norm_type)  # Lightning: one norm per tensor, plus the total
        if not per_parameter:
            return {}
        prefix = f"grad_{self.norm_type}_norm"
        metrics = {"diag/grad_norm/total": float(per_parameter[f"{prefix}_total"])}
        for block, names in self._blocks.items():
            values = [per_parameter[key] for key in (f"{prefix}/{name}" for name in names) if key in per_parameter]
            if values:  # the norm of per-tensor norms is the norm of the whole block
                metrics[f"diag/grad_norm/{block}"] = float(torch.stack(values).norm(self.norm_type))
        return metrics

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        if _due(trainer, self.every_n_steps):
            _log(trainer, self.norms(pl_module), trainer.global_step)


class ActivationStats(Callback):
    """Log activation statistics of a few layers every ``every_n_steps`` training steps.

    Forward hooks exist only during a sampled batch, so other steps have no overhead. Metrics:
    ``diag/act/<layer>/mean``, ``/std`` and for ReLU layers ``/dead_frac`` (see :func:`activation_stats`); a
    module called several times per forward reports its last call.

    Args:
        every_n_steps: interval in optimizer steps (the first is always sampled); ``None``: ``log_every_n_steps``.
        layers: module names to watch (``backbone.blocks.6.0.bn2.act``); ``None``: see :func:`activation_layers`.
        max_layers: at most this many layers when ``layers`` is ``None``.
    """

    def __init__(self, every_n_steps: int | None = None, layers: list[str] | None = None, max_layers: int = 12) -> None:
        _check_interval(every_n_steps)
        if max_layers < 1:
            raise ValueError(f"Expected argument `max_layers` to be at least 1, but got {max_layers}")
        self.every_n_steps, self.layers, self.max_layers = every_n_steps, layers, max_layers
        self._handles: list[RemovableHandle] = []
        self._stats: dict[str, float] = {}
        self._step = 0

    def _modules(self, pl_module: LightningModule) -> dict[str, nn.Module]:
        named = dict(pl_module.named_modules())
        names = self.layers if self.layers is not None else activation_layers(pl_module, self.max_layers)
        unknown = [name for name in names if name not in named]
        if unknown:
            raise ValueError(f"ActivationStats: the model has no module named {unknown[0]!r} (argument `layers`)")
        return {name: named[name] for name in names}

    def _hook(self, name: str, relu_like: bool):
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, Tensor):
                for key, value in activation_stats(output, relu_like).items():
                    self._stats[f"diag/act/{name}/{key}"] = value

        return record

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not _due(trainer, self.every_n_steps):
            return
        self._step = trainer.global_step
        for name, module in self._modules(pl_module).items():
            hook = self._hook(name, isinstance(module, RELU_LIKE))
            self._handles.append(module.register_forward_hook(hook))

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._handles:
            self._remove()
            _log(trainer, self._stats, self._step)  # the step the batch started at, as GradientStats logs
            self._stats = {}

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._remove()
