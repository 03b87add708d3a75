"""Selective prediction Metric classes: same values as the functions, accumulation, DDP sync and arg checks."""

from __future__ import annotations

import doctest
import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medtransfer.metrics import functional as F
from medtransfer.metrics import selective as S
from medtransfer.metrics.selective import (
    AUGRC,
    AURC,
    EAURC,
    CoverageAtAccuracy,
    CoverageAtRisk,
    RiskCoverageCurve,
    SelectiveAccuracy,
    SelectiveMetricsAtCoverage,
)

SCALAR_METRICS = [
    (AURC, {}, lambda c, k, p, y: F.aurc(c, k)),
    (EAURC, {}, lambda c, k, p, y: F.eaurc(c, k)),
    (AUGRC, {}, lambda c, k, p, y: F.augrc(c, k)),
    (SelectiveAccuracy, {"coverage": 0.7}, lambda c, k, p, y: 1 - F.selective_risk_at_coverage(c, k, 0.7)),
    (CoverageAtAccuracy, {"min_accuracy": 0.8}, lambda c, k, p, y: F.coverage_at_accuracy(c, k, 0.8)),
    (CoverageAtRisk, {"max_risk": 0.3}, lambda c, k, p, y: F.coverage_at_risk(c, k, 0.3)),
]


def _data(task: str, n: int = 97, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities rounded to 2 decimals (ties) that are informative about the target."""
    gen = torch.Generator().manual_seed(seed)
    if task == "multiclass":
        target = torch.randint(0, 4, (n,), generator=gen)
        logits = torch.randn(n, 4, generator=gen) + 2 * torch.nn.functional.one_hot(target, 4)
        return logits.softmax(-1).round(decimals=2).clamp(0, 1), target
    shape = (n,) if task == "binary" else (n, 3)
    target = torch.randint(0, 2, shape, generator=gen)
    return (torch.rand(shape, generator=gen) * 0.6 + 0.4 * target).round(decimals=2), target


def _inputs(probs, target, task, threshold=0.5, score="max_prob"):
    conf = F.confidence_scores(probs, task, threshold, score)
    preds = F.predictions(probs, task, threshold)
    return conf, preds == target, preds, target


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
@pytest.mark.parametrize(("cls", "kwargs", "fn"), SCALAR_METRICS, ids=[m[0].__name__ for m in SCALAR_METRICS])
def test_metric_equals_function_and_accumulates_over_updates(task, cls, kwargs, fn):
    probs, target = _data(task)
    metric = cls(task=task, **kwargs)
    for chunk in (slice(0, 10), slice(10, 11), slice(11, 60), slice(60, None)):
        metric.update(probs[chunk], target[chunk])
    expected = fn(*_inputs(probs, target, task))
    torch.testing.assert_close(metric.compute(), expected)
    assert metric.compute().shape == ((3,) if task == "multilabel" else ())
    one_shot = cls(task=task, **kwargs)
    one_shot.update(probs, target)
    torch.testing.assert_close(one_shot.compute(), metric.compute())
    metric.reset()
    metric.update(probs[:40], target[:40])
    torch.testing.assert_close(metric.compute(), fn(*_inputs(probs[:40], target[:40], task)))


def test_margin_score_and_per_label_thresholds_reach_the_functions():
    probs, target = _data("multilabel")
    thresholds = [0.3, 0.5, 0.7]
    metric = AURC(task="multilabel", score="margin", threshold=thresholds)
    metric.update(probs, target)
    conf, correct, _, _ = _inputs(probs, target, "multilabel", torch.tensor(thresholds), "margin")
    torch.testing.assert_close(metric.compute(), F.aurc(conf, correct))


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_risk_coverage_curve_per_task(task):
    probs, target = _data(task)
    metric = RiskCoverageCurve(task=task)
    metric.update(probs[:50], target[:50])
    metric.update(probs[50:], target[50:])
    conf, correct, _, _ = _inputs(probs, target, task)
    if task == "multilabel":
        curves = metric.compute()
        assert len(curves) == 3
        for j, curve in enumerate(curves):
            torch.testing.assert_close(curve, F.risk_coverage_curve(conf[:, j], correct[:, j]))
    else:
        torch.testing.assert_close(metric.compute(), F.risk_coverage_curve(conf, correct))


@pytest.mark.parametrize("task", ["binary", "multilabel"])
def test_selective_metrics_at_coverage_returns_every_key(task):
    probs, target = _data(task)
    metric = SelectiveMetricsAtCoverage(coverage=0.6, task=task)
    metric.update(probs, target)
    out = metric.compute()
    conf, _, preds, _ = _inputs(probs, target, task)
    expected = F.selective_metrics_at_coverage(conf, preds, target, 0.6)
    assert out.keys() == expected.keys() == {"coverage", "risk", "accuracy", "sensitivity", "specificity"}
    torch.testing.assert_close(out, expected)
    assert bool((out["coverage"] >= 0.6).all())


def test_forward_returns_the_batch_value_and_keeps_the_epoch_value():
    probs, target = _data("binary")
    metric = AUGRC()
    batch_value = metric(probs[:30], target[:30])
    torch.testing.assert_close(batch_value, F.augrc(*_inputs(probs[:30], target[:30], "binary")[:2]))
    metric(probs[30:], target[30:])
    torch.testing.assert_close(metric.compute(), F.augrc(*_inputs(probs, target, "binary")[:2]))


def test_class_flags_follow_torchmetrics_conventions():
    for cls in (AURC, EAURC, AUGRC, SelectiveAccuracy, CoverageAtAccuracy, CoverageAtRisk, RiskCoverageCurve):
        assert cls.is_differentiable is False and cls.full_state_update is False
    assert AURC.higher_is_better is False and SelectiveAccuracy.higher_is_better is True
    assert CoverageAtAccuracy.higher_is_better is True and RiskCoverageCurve.higher_is_better is None


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: SelectiveAccuracy(coverage=1.5), r"`coverage` to be in \(0, 1\], but got 1.5"),
        (lambda: SelectiveAccuracy(coverage=0), r"`coverage` to be in \(0, 1\], but got 0"),
        (lambda: CoverageAtAccuracy(min_accuracy=2.0), r"`min_accuracy` to be in \[0, 1\]"),
        (lambda: CoverageAtRisk(max_risk=-0.5), r"`max_risk` to be in \[0, 1\]"),
        (lambda: AURC(task="regression"), "`task` to be one of"),
        (lambda: AURC(score="entropy"), "`score` to be one of"),
        (lambda: AURC(threshold=1.5), r"`threshold` to be in \[0, 1\]"),
        (lambda: AURC(task="binary", threshold=[0.3, 0.5]), "`threshold` to be a float for a binary task"),
        (lambda: SelectiveMetricsAtCoverage(task="multiclass"), "`task` to be 'binary' or 'multilabel'"),
    ],
)
def test_bad_constructor_arguments_are_rejected(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    ("task", "probs", "target", "match"),
    [
        ("binary", torch.tensor([0.2, 1.5]), torch.tensor([0, 1]), r"but got 1.5 at index \(1,\)"),
        ("binary", torch.tensor([0.2, float("nan")]), torch.tensor([0, 1]), "finite values, but got nan"),
        ("binary", torch.tensor([]), torch.tensor([]), "empty batch"),
        ("binary", torch.tensor([0.2, 0.4]), torch.tensor([0, 2]), "`target` to hold 0/1 values, but got 2"),
        ("multiclass", torch.full((2, 3), 1 / 3), torch.tensor([0, 3]), r"class indices in \[0, 2\], but got 3"),
        ("multilabel", torch.rand(4, 3), torch.ones(4, 2), r"`target` of shape \(4, 3\)"),
    ],
)
def test_bad_updates_are_rejected(task, probs, target, match):
    with pytest.raises(ValueError, match=match):
        AURC(task=task).update(probs, target)


def test_max_prob_with_a_moved_threshold_warns_with_a_hint():
    with pytest.warns(UserWarning, match="HINT: use score='margin'"):
        AURC(threshold=0.3)


def test_docstring_examples():
    assert doctest.testmod(S, raise_on_error=False).failed == 0


# ------------------------------------------------------------------------------------------------- real DDP
DDP_METRICS = {
    "aurc": lambda: AURC(task="multiclass"),
    "eaurc": lambda: EAURC(task="multiclass"),
    "augrc": lambda: AUGRC(task="multiclass"),
    "selective_accuracy": lambda: SelectiveAccuracy(coverage=0.8, task="multiclass"),
    "coverage_at_accuracy": lambda: CoverageAtAccuracy(min_accuracy=0.9, task="multiclass"),
    "curve_risk": lambda: RiskCoverageCurve(task="multiclass"),
}


def _compute_all(probs: torch.Tensor, target: torch.Tensor) -> dict[str, list[float]]:
    out = {}
    for name, build in DDP_METRICS.items():
        metric = build()
        metric.update(probs, target)
        value = metric.compute()
        out[name] = (value[1] if name == "curve_risk" else value).flatten().tolist()
    return out


def _ddp_worker(rank: int, world_size: int, port: int, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        probs, target = _data("multiclass", n=101, seed=7)
        split = 45  # uneven shards: torchmetrics pads and trims when gathering
        part = slice(0, split) if rank == 0 else slice(split, None)
        values = _compute_all(probs[part], target[part])  # each metric syncs across both ranks in compute()
        if rank == 0:
            Path(result_file).write_text(json.dumps(values))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_compute_equals_single_process(tmp_path):
    result_file = tmp_path / "rank0.json"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(result_file)), nprocs=2, join=True)
    ddp = json.loads(result_file.read_text())
    single = _compute_all(*_data("multiclass", n=101, seed=7))
    assert ddp.keys() == single.keys()
    for name, values in single.items():
        assert ddp[name] == pytest.approx(values, abs=1e-6), name
