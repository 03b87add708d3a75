"""Prevalence estimation and adaptation against a known model: Gaussian classes whose exact posteriors are the
"calibrated probabilities", drawn at one prevalence for calibration and at others for the batch."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from medtransfer.decisions.prevalence import (
    MIN_CASES,
    _columns,
    _em,
    _shares,
    _two_class_mle,
    adapt_probabilities,
    batch_prevalence,
    calibration_shares,
    estimate_prevalence,
    given_prevalence,
    shift_explanation,
    summary_entry,
)
from medtransfer.errors import DataError

SOURCE = 0.742  # PneumoniaMNIST's validation prevalence
MEANS = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])  # three classes in the plane, unit variance


def _binary(n: int, share: float, seed: int, spread: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact posteriors at prevalence ``SOURCE`` of cases drawn at ``share`` (N(0, 1) vs N(2, 1)); ``spread``
    other than 1 stretches the images, which no prevalence explains."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < share).long()
    x = (torch.randn(n, generator=g, dtype=torch.float64) + 2.0 * y) * spread
    return torch.sigmoid(2 * x - 2 + math.log(SOURCE / (1 - SOURCE))), y


def _multiclass(n: int, shares: list[float], source: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.multinomial(torch.tensor(shares), n, replacement=True, generator=g)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) + MEANS[y].double()
    return (-((x[:, None] - MEANS[None].double()) ** 2).sum(-1) / 2 + source.log()).softmax(-1), y


def _multilabel(n: int, shares: torch.Tensor, source: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, len(shares), generator=g) < shares).long()
    x = torch.randn(n, len(shares), generator=g, dtype=torch.float64) + 2.0 * y
    return torch.sigmoid(2 * x - 2 + (source / (1 - source)).log()), y


@pytest.fixture(scope="module")
def binary_record() -> dict:
    return calibration_shares(*_binary(2000, SOURCE, seed=1), "binary")


@pytest.mark.parametrize("method", ["em", "bbse"])
@pytest.mark.parametrize("share", [0.1, 0.3, 0.625, 0.9])
def test_binary_shares_are_recovered_within_their_interval(binary_record, method, share):
    probs, y = _binary(624, share, seed=2)
    source, confusion = torch.tensor(binary_record["prevalence"]), torch.tensor(binary_record["confusion"])
    result = estimate_prevalence(probs, source, "binary", method, confusion)
    truth = float(y.double().mean())
    assert result.method == method and result.estimated.shape == (2,) and result.interval.shape == (2, 2)
    assert float(result.estimated.sum()) == pytest.approx(1.0)
    assert float(result.estimated[1]) == pytest.approx(truth, abs=0.05)
    low, high = result.interval[1].tolist()
    assert low <= float(result.estimated[1]) <= high and low - 0.01 <= truth <= high + 0.01
    assert result.source.tolist() == pytest.approx([1 - SOURCE, SOURCE], abs=0.03)


@pytest.mark.parametrize("task", ["binary", "multilabel"])
def test_the_two_class_maximum_is_where_em_converges(task):
    """Newton's method on the likelihood's derivative lands where EM, run to convergence, ends: shares near 0 and
    1, one at the boundary (EM's end too), an uninformative model (flat likelihood: EM stays at its start), batched
    as bootstrap replicates (binary) or findings (multi-label), from EM's start or another."""
    shares = [0.02, 0.98, 0.005, 0.999, 0.3, 0.7]
    if task == "binary":
        probs = torch.stack([_binary(1000, s, seed=20 + i)[0] for i, s in enumerate(shares)])
        probs = torch.cat([probs, torch.full((1, 1000), SOURCE, dtype=torch.float64)])
        source = torch.tensor([1 - SOURCE, SOURCE], dtype=torch.float64)
    else:
        source = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.05, 0.7], dtype=torch.float64)
        probs = _multilabel(1000, torch.tensor(shares), source, seed=30)[0]
    columns, source = _columns(probs, task), _shares(source, task)
    converged = _em(columns, source, max_iter=100_000, tol=1e-14)
    solved = _two_class_mle(columns, source)
    torch.testing.assert_close(solved, converged, atol=1e-6, rtol=0)
    assert float(solved[3, 1]) == 1.0 and float(solved[1, 1]) < 1.0
    restarted = _two_class_mle(columns, source, start=torch.full(columns.shape[:-2], 0.5, dtype=torch.float64))
    torch.testing.assert_close(restarted[: len(shares)], solved[: len(shares)], atol=1e-10, rtol=0)


def test_adapted_probabilities_are_the_posteriors_at_the_new_prevalence():
    """Re-weighting the posteriors at ``SOURCE`` gives exactly the posteriors a model calibrated at 0.3 states."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, generator=g, dtype=torch.float64) * 3
    at_source = torch.sigmoid(2 * x - 2 + math.log(SOURCE / (1 - SOURCE)))
    at_target = torch.sigmoid(2 * x - 2 + math.log(0.3 / 0.7))
    adapted = adapt_probabilities(at_source, torch.tensor([1 - SOURCE, SOURCE]), torch.tensor([0.7, 0.3]), "binary")
    torch.testing.assert_close(adapted, at_target)
    saturated = torch.tensor([1 - 1e-12, 1 - 1e-13, 1 - 1e-14], dtype=torch.float64)  # their order survives
    moved = adapt_probabilities(saturated, torch.tensor([0.25, 0.75]), torch.tensor([0.5, 0.5]), "binary")
    assert bool((moved.diff() > 0).all())


def test_adapting_to_the_estimate_moves_accuracy_towards_the_bayes_decision(binary_record):
    probs, y = _binary(2000, 0.2, seed=3)
    source = torch.tensor(binary_record["prevalence"])
    result = estimate_prevalence(probs, source, "binary")
    adapted = adapt_probabilities(probs, source, result.estimated, "binary")
    before, after = ((probs >= 0.5).long() == y).double().mean(), ((adapted >= 0.5).long() == y).double().mean()
    assert after > before + 0.03


@pytest.mark.parametrize("method", ["em", "bbse"])
def test_multiclass_shares_are_recovered(method):
    source = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    record = calibration_shares(*_multiclass(3000, source.tolist(), source, seed=4), "multiclass")
    probs, y = _multiclass(1000, [0.2, 0.2, 0.6], source, seed=5)
    result = estimate_prevalence(
        probs, torch.tensor(record["prevalence"]), "multiclass", method, torch.tensor(record["confusion"])
    )
    assert result.estimated.shape == (3,) and result.interval.shape == (3, 2)
    torch.testing.assert_close(result.estimated, torch.bincount(y).double() / len(y), atol=0.04, rtol=0)
    adapted = adapt_probabilities(probs, torch.tensor(record["prevalence"]), result.estimated, "multiclass")
    torch.testing.assert_close(adapted.sum(-1), torch.ones(len(y), dtype=torch.float64))


@pytest.mark.parametrize("method", ["em", "bbse"])
def test_multilabel_shares_are_recovered_per_finding(method):
    source = torch.tensor([0.3, 0.6], dtype=torch.float64)
    record = calibration_shares(*_multilabel(3000, source, source, seed=6), "multilabel")
    assert torch.tensor(record["confusion"]).shape == (2, 2, 2)
    probs, y = _multilabel(800, torch.tensor([0.1, 0.8]), source, seed=7)
    result = estimate_prevalence(
        probs, torch.tensor(record["prevalence"]), "multilabel", method, torch.tensor(record["confusion"])
    )
    assert result.estimated.shape == (2,) and result.interval.shape == (2, 2)
    torch.testing.assert_close(result.estimated, y.double().mean(0), atol=0.04, rtol=0)
    assert adapt_probabilities(probs, source, result.estimated, "multilabel").shape == probs.shape


def test_a_finding_at_the_boundary_keeps_its_calibration_share(caplog):
    source = torch.tensor([0.3, 0.6], dtype=torch.float64)
    probs, _ = _multilabel(800, torch.tensor([0.0, 0.5]), source, seed=8)
    probs[:, 0] = 1e-9  # no case has the first finding
    with caplog.at_level(logging.WARNING):
        result = estimate_prevalence(probs, source, "multilabel")
    assert float(result.estimated[0]) == pytest.approx(0.3) and 0.4 < float(result.estimated[1]) < 0.6
    assert "finding(s) [0]" in caplog.text


@pytest.mark.parametrize(
    ("probs", "source", "kwargs", "message"),
    [
        (torch.full((MIN_CASES - 1,), 0.5), [0.3, 0.7], {}, f"too small (at least {MIN_CASES}"),
        (torch.full((100,), float("nan")), [0.3, 0.7], {}, "not finite"),
        (torch.full((100,), 1.5), [0.3, 0.7], {}, "not in [0, 1]"),
        (torch.full((100, 3), 0.3), [0.3, 0.7], {}, "do not match"),
        (torch.full((100,), 0.5), [0.0, 1.0], {}, "no calibration case"),
        (torch.full((100,), 0.5), [0.3, 0.7], {"method": "bbse"}, "needs the calibration confusion"),
        (torch.full((100,), 0.5), [0.3, 0.7], {"method": "bbse", "confusion": torch.ones(2, 2)}, "singular"),
        (torch.full((100,), 1e-9), [0.3, 0.7], {}, "seems to lack class 1"),
    ],
)  # fmt: skip
def test_bad_input_warns_and_falls_back_to_no_adaptation(probs, source, kwargs, message, caplog):
    with caplog.at_level(logging.WARNING):
        assert estimate_prevalence(probs, torch.tensor(source), "binary", **kwargs) is None
    assert message in caplog.text and "not adapted" in caplog.text and len(caplog.records) == 1


def test_a_given_prevalence_is_one_share_or_one_per_class():
    source = torch.tensor([0.258, 0.742], dtype=torch.float64)
    given = given_prevalence([0.3], source, "binary")
    assert given.method == "given" and given.estimated.tolist() == pytest.approx([0.7, 0.3])
    assert given.interval.flatten().tolist() == pytest.approx([0.7, 0.7, 0.3, 0.3])
    assert given_prevalence([0.2], torch.tensor([0.3, 0.6]), "multilabel").estimated.tolist() == [0.2, 0.2]
    for shares, match in (([0.3, 0.3], "sum to 1"), ([1.2], r"in \(0, 1\)"), ([0.2, 0.3, 0.5], "1 or 2 share")):
        with pytest.raises(ValueError, match=match):
            given_prevalence(shares, source, "binary")


def test_the_batch_shares_come_from_the_models_record_estimated_or_given(binary_record, caplog):
    """``--prevalence``'s choice, shared by predict and evaluate: the record's shares (and, for ``bbse``, its
    confusion matrix) against the batch; given shares as they are; a record without shares warns and adapts
    nothing; values that are not shares are one DataError naming the option."""
    probs, _ = _binary(624, 0.3, seed=2)
    for method in ("em", "bbse"):
        source, confusion = torch.tensor(binary_record["prevalence"]), torch.tensor(binary_record["confusion"])
        expected = estimate_prevalence(probs, source, "binary", method, confusion)
        chosen = batch_prevalence(probs, binary_record, "binary", "estimate", method)
        torch.testing.assert_close(chosen.estimated, expected.estimated)
    given = batch_prevalence(probs, binary_record, "binary", [0.3])
    assert given.method == "given" and given.estimated.tolist() == pytest.approx([0.7, 0.3])
    with caplog.at_level(logging.WARNING):
        assert batch_prevalence(probs, {"n": 10}, "binary", "estimate", model="old.ckpt") is None
    assert "old.ckpt holds no calibration class shares" in caplog.text and len(caplog.records) == 1
    with pytest.raises(DataError, match=r"--prevalence 0\.3,0\.3: .*sum to 1"):
        batch_prevalence(probs, binary_record, "binary", [0.3, 0.3])
    names = ["normal", "pneumonia"]
    assert summary_entry(given, names, [0.3]) == {**given.to_dict(names), "adapted": True}
    assert summary_entry(None, names, "estimate", "bbse") == {"method": "bbse", "adapted": False}
    assert summary_entry(None, names, [0.3], "bbse") == {"method": "given", "adapted": False}


def test_the_summary_names_each_class(binary_record):
    result = estimate_prevalence(_binary(300, 0.5, seed=9)[0], torch.tensor(binary_record["prevalence"]), "binary")
    values = result.to_dict(["normal", "pneumonia"])
    assert values["method"] == "em" and list(values["estimated"]) == ["normal", "pneumonia"]
    low, high = values["interval"]["pneumonia"]
    assert low <= values["estimated"]["pneumonia"] <= high and values["source"]["pneumonia"] > 0.7


def test_a_prevalence_shift_is_told_apart_from_different_images(binary_record):
    """Fewer sick cases: re-weighting explains the change; stretched images (another scanner): it does not."""
    explained, text = shift_explanation(binary_record, _binary(624, 0.4, seed=10)[0], "binary")
    assert explained and "explains it" in text
    explained, text = shift_explanation(binary_record, _binary(624, 0.6, seed=11, spread=0.5)[0], "binary")
    assert not explained and "the images themselves differ" in text
    assert shift_explanation({"prevalence": [0.3, 0.7]}, _binary(624, 0.4, seed=10)[0], "binary") is None
