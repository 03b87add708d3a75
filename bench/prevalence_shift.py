"""Decisions under a change of prevalence: estimate the class shares without labels, adapt, and keep the guarantee.

A PneumoniaMNIST checkpoint (``make fit``'s) is run once on validation (524 images, prevalence 0.742) and test (624,
0.625); its logits are cached under ``/tmp``. Temperature and the Youden threshold are fitted on validation, as
``fit`` does with calibration on. The test split is then used as is (``official``) and resampled, class by class
with replacement, to pneumonia prevalences 0.1-0.9 (``--seeds`` batches of 624 each). Per batch and method:

* ``none``: calibrated probabilities at the validation threshold (no adaptation);
* ``em`` / ``bbse``: ``decisions.prevalence.estimate_prevalence`` on the batch (no labels), probabilities adapted
  by ``adapt_probabilities``, decision at the validation threshold (what ``predict --prevalence estimate`` does);
* ``given``: the true prevalence of the batch, adapted the same way (the best an estimate can do);
* ``em_at_0.5``: ``em``'s probabilities decided at 0.5, the Bayes decision for accuracy in the adapted population;

scored as the issue scores a predictions CSV: estimated vs true prevalence, accuracy, ECE (15 equal bins on the
probability stated for each decision) and selective accuracy at 80 % coverage ranked by that probability.

**Risk control where the model is used.** The labelled calibration cases come from the same population as the
target batch but at another prevalence, so the pool defines the truth: a calibration set is a random half of the
test pool (prevalence near 0.625), the decisions are the ``em``-adapted ones, the batch's shares are estimated by
BBSE against that half's soft confusion matrix (the labelled data at hand; 50 bootstrap replicates for the
interval), and the certified cut-off's
selective risk is measured on the whole pool re-weighted to the batch's prevalence (the population both are
drawn from; ``bench/risk_control.py`` explains why not the other half). ``plain`` is
``control_selective_risk`` on the calibration half as it is; ``shifted`` is ``control_shifted_risk`` at the
corners of that estimate's 95 % interval (``prevalence_vertices``); ``shifted_true`` at the true shares.
The EM estimate against validation is not used there: validation and test differ by more than prevalence (the
exchangeability check says so), which biases it, and no interval of the batch's sampling noise covers that.
A violation is a certified cut-off whose pool risk exceeds ``target_risk``; the rate should stay at or below
``delta`` within two binomial standard errors (``--resplits`` halves per batch, so ``seeds * resplits`` draws per
prevalence; draws of one batch share its estimate).

Usage: python bench/prevalence_shift.py --checkpoint PATH [--seeds 20] [--resplits 25]
[--out bench/results/prevalence_shift.json]
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from medtransfer.decisions.prevalence import adapt_probabilities, calibration_shares, estimate_prevalence
from medtransfer.decisions.risk_control import (
    REFER_ALL,
    RiskControl,
    control_selective_risk,
    control_shifted_risk,
    prevalence_vertices,
)
from medtransfer.decisions.temperature import fit_temperature
from medtransfer.decisions.thresholds import fit_threshold

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
PREVALENCES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
PAIRS = [(0.05, 0.1), (0.10, 0.1)]
METHODS = ("none", "em", "bbse", "given", "em_at_0.5")


def cached_logits(checkpoint: Path, npz: Path) -> dict[str, np.ndarray]:
    """Validation and test logits and labels of ``checkpoint`` (``bench/risk_control.py``'s loader, on logits),
    cached under ``/tmp`` by the checkpoint's content."""
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:16]
    cache = Path("/tmp") / f"prevalence_shift_{digest}.npz"
    if cache.exists():
        return dict(np.load(cache))
    from medtransfer.data.medmnist import MedMNISTDataModule
    from medtransfer.models.classifier import ClassifierModule

    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = ClassifierModule.load_from_checkpoint(checkpoint, pretrained="none", map_location="cpu", weights_only=True)
    model.eval()
    settings = raw["input"]
    data = MedMNISTDataModule(
        path=str(npz), image_size=settings["size"], mean=settings["mean"], std=settings["std"],
        interpolation=settings["interpolation"], channels=settings["channels"], batch_size=128,
    )  # fmt: skip
    data.setup("fit")
    out = {}
    with torch.no_grad():
        for split, loader in (("val", data.val_dataloader()), ("test", data.test_dataloader())):
            out[f"{split}_logits"] = torch.cat([model(x) for x, _ in loader]).double().reshape(-1).numpy()
            out[f"{split}_labels"] = np.concatenate([y.numpy() for _, y in loader]).reshape(-1)
    np.savez(cache, **out)
    return out


def stated(probs: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Decisions at ``threshold`` and the probability each decision states (``p`` or ``1 - p``)."""
    decision = (probs >= threshold).astype(int)
    return decision, np.where(decision == 1, probs, 1 - probs)


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error over ``bins`` equal-width bins of the stated probability."""
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(index):
        rows = index == b
        total += rows.sum() * abs(correct[rows].mean() - confidence[rows].mean())
    return total / len(confidence)


def selective_accuracy(confidence: np.ndarray, correct: np.ndarray, coverage: float = 0.8) -> float:
    """Accuracy on the ``coverage`` share of cases with the highest stated probability."""
    keep = np.argsort(-confidence, kind="stable")[: math.ceil(coverage * len(confidence))]
    return float(correct[keep].mean())


class Setting:
    """The calibrated model: probabilities, Youden threshold and the calibration record, all from validation."""

    def __init__(self, logits: dict[str, np.ndarray]) -> None:
        val_logits, val_y = torch.from_numpy(logits["val_logits"]), torch.from_numpy(logits["val_labels"])
        self.temperature = fit_temperature(val_logits, val_y, "binary")
        val_probs = torch.sigmoid(val_logits / self.temperature)
        self.threshold = float(fit_threshold(val_probs, val_y, "youden"))
        record = calibration_shares(val_probs, val_y, "binary")
        self.source = torch.tensor(record["prevalence"], dtype=torch.float64)
        self.confusion = torch.tensor(record["confusion"], dtype=torch.float64)
        self.test_probs = torch.sigmoid(torch.from_numpy(logits["test_logits"]) / self.temperature)
        self.test_labels = logits["test_labels"].astype(int)

    def decide(
        self, probs: torch.Tensor, method: str, truth: float, estimates: dict
    ) -> tuple[np.ndarray, np.ndarray, float | None, object]:
        """Decisions, stated probabilities, estimated prevalence and the estimate itself for ``method`` (estimates
        of this batch kept in ``estimates``)."""
        threshold = 0.5 if method == "em_at_0.5" else self.threshold
        method = method.removesuffix("_at_0.5")
        if method == "none":
            return (*stated(probs.numpy(), self.threshold), None, None)
        if method == "given":
            target = torch.tensor([1 - truth, truth], dtype=torch.float64)
            estimate = None
        else:
            if method not in estimates:
                estimates[method] = estimate_prevalence(probs, self.source, "binary", method, confusion=self.confusion)
            estimate = estimates[method]
            if estimate is None:
                return (*stated(probs.numpy(), self.threshold), None, None)
            target = estimate.estimated
        adapted = adapt_probabilities(probs, self.source, target, "binary").numpy()
        return (*stated(adapted, threshold), float(target[1]), estimate)


def batches(labels: np.ndarray, seeds: int) -> list[tuple[str, float, int, np.ndarray]]:
    """``official`` test, then per prevalence and seed a class-stratified resample (with replacement) of its size."""
    out = [("official", float(labels.mean()), 0, np.arange(len(labels)))]
    positive, negative = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    for prevalence in PREVALENCES:
        for seed in range(seeds):
            rng = np.random.default_rng([seed, round(prevalence * 100)])
            k = round(prevalence * len(labels))
            rows = np.concatenate([rng.choice(positive, k), rng.choice(negative, len(labels) - k)])
            out.append(("resampled", prevalence, seed, rows))
    return out


def pool_risk(confidence: np.ndarray, correct: np.ndarray, labels: np.ndarray, cutoff: float, share: float) -> float:
    """Selective risk at ``cutoff`` on the pool re-weighted to a positive ``share``."""
    weights = np.where(labels == 1, share / labels.mean(), (1 - share) / (1 - labels.mean()))
    decided = confidence >= cutoff
    return float((weights * (decided & ~correct)).sum() / max((weights * decided).sum(), 1e-12))


def risk_control_draws(
    setting: Setting, prevalence: float, batch: torch.Tensor, estimate, resplits: int, seed: int
) -> list[dict]:
    """Certified cut-offs of the three controls on ``resplits`` random halves of the pool, with the pool's risk;
    ``shifted`` estimates the ``batch``'s shares by BBSE against the half's own soft confusion matrix."""
    target = estimate.estimated if estimate is not None else setting.source
    probs = adapt_probabilities(setting.test_probs, setting.source, target, "binary").numpy()
    labels = setting.test_labels
    decision, confidence = stated(probs, setting.threshold)
    correct = decision == labels
    truth = np.array([1 - prevalence, prevalence])
    weights = np.where(labels == 1, prevalence, 1 - prevalence)  # the pool at the batch's prevalence, per case
    rng = np.random.default_rng([seed, round(prevalence * 100), 7])
    draws = []
    for _ in range(resplits):
        half = rng.permutation(len(labels))[: len(labels) // 2]
        record = calibration_shares(setting.test_probs[half], torch.from_numpy(labels[half]), "binary")
        shares = estimate_prevalence(
            batch,
            torch.tensor(record["prevalence"]),
            "binary",
            "bbse",
            confusion=torch.tensor(record["confusion"]),
            n_bootstrap=50,
            seed=seed,
        )
        corners = None if shares is None else prevalence_vertices(shares.estimated, shares.interval)
        for target_risk, delta in PAIRS:
            args = (confidence[half], correct[half])
            controls = {
                "plain": control_selective_risk(*args, target_risk, delta),
                "shifted_true": control_shifted_risk(*args, labels[half], truth, target_risk, delta),
            }
            controls["shifted"] = (  # no estimate (a class seems absent): no adaptation, every case referred
                control_shifted_risk(*args, labels[half], corners, target_risk, delta)
                if corners is not None
                else RiskControl(REFER_ALL, False, 0.0, 0.0, 1.0, len(half))
            )
            for name, result in controls.items():
                risk = pool_risk(confidence, correct, labels, result.cutoff, prevalence) if result.certified else 0.0
                draws.append({
                    "control": name, "target_risk": target_risk, "delta": delta, "certified": result.certified,
                    "violated": bool(result.certified and risk > target_risk),
                    "coverage": float((weights * (confidence >= result.cutoff)).sum() / weights.sum()),
                })  # fmt: skip
    return draws


def summarise(rows: list[dict], keys: tuple[str, ...], values: tuple[str, ...]) -> list[dict]:
    """Means of ``values`` over the rows sharing ``keys``."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for key, members in groups.items():
        record = dict(zip(keys, key, strict=True)) | {"batches": len(members)}
        for value in values:
            numbers = [m[value] for m in members if m[value] is not None]
            record[value] = round(float(np.mean(numbers)), 4) if numbers else None
        out.append(record)
    return out


def prevalence_shift_benchmark(
    checkpoint: Path,
    npz: Path = DATA / "pneumoniamnist.npz",
    seeds: int = 20,
    resplits: int = 25,
    machine: str = "2-core x86 CPU",
    out: Path = REPO / "bench" / "results" / "prevalence_shift.json",
) -> dict:
    """Run the estimation, decision and risk-control comparison and store it.

    Args:
        checkpoint: a binary PneumoniaMNIST checkpoint (``make fit``'s best).
        npz: the PneumoniaMNIST file.
        seeds: resampled batches per prevalence.
        resplits: calibration halves per batch for the risk-control violation rate.
        machine: the hardware, for the record.
        out: where the results go (written atomically).
    """
    start = time.perf_counter()
    setting = Setting(cached_logits(checkpoint, npz))
    decisions, draws = [], []
    for kind, prevalence, seed, rows in batches(setting.test_labels, seeds):
        probs, labels = setting.test_probs[rows], setting.test_labels[rows]
        truth, estimates = float(labels.mean()), {}
        for method in METHODS:
            decision, confidence, estimated, estimate = setting.decide(probs, method, truth, estimates)
            correct = decision == labels
            decisions.append({
                "batch": kind, "prevalence": prevalence, "method": method, "seed": seed, "true_prevalence": truth,
                "estimated_prevalence": estimated,
                "abs_error": None if estimated is None else abs(estimated - truth),
                "within_0_05": None if estimated is None else float(abs(estimated - truth) <= 0.05),
                "accuracy": float(correct.mean()), "ece": ece(confidence, correct),
                "selective_accuracy_80": selective_accuracy(confidence, correct),
                "distinct_confidences": len(np.unique(confidence)) / len(confidence),
            })  # fmt: skip
            if method == "em" and kind == "resampled":
                for draw in risk_control_draws(setting, prevalence, probs, estimate, resplits, seed):
                    draws.append(draw | {"prevalence": prevalence})
    values = ("true_prevalence", "estimated_prevalence", "abs_error", "within_0_05", "accuracy", "ece",
              "selective_accuracy_80", "distinct_confidences")  # fmt: skip
    control = summarise(draws, ("prevalence", "control", "target_risk", "delta"), ("violated", "certified",
                                                                                  "coverage"))  # fmt: skip
    for record in control:
        noise = 2 * math.sqrt(record["delta"] * (1 - record["delta"]) / record["batches"])
        record |= {"violation_rate": record.pop("violated"), "noise_2se": round(noise, 4)}
        record["within_delta"] = bool(record["violation_rate"] <= record["delta"] + noise)
    result = {
        "model": str(checkpoint), "machine": machine, "seconds": round(time.perf_counter() - start, 1),
        "temperature": round(setting.temperature, 4), "threshold": round(setting.threshold, 4),
        "calibration_prevalence": round(float(setting.source[1]), 4), "seeds": seeds, "resplits": resplits,
        "decisions": summarise(decisions, ("batch", "prevalence", "method"), values),
        "risk_control": control,
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".json.partial")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    partial.replace(out)
    print(f"temperature {setting.temperature:.3f}, validation threshold {setting.threshold:.3f}")
    print(f"{'batch':<10} {'prev':>5} {'method':<6} {'est':>6} {'acc':>6} {'ece':>6} {'sel80':>6}")
    for r in result["decisions"]:
        est = "-" if r["estimated_prevalence"] is None else f"{r['estimated_prevalence']:.3f}"
        print(f"{r['batch']:<10} {r['prevalence']:>5.3f} {r['method']:<6} {est:>6} {r['accuracy']:>6.3f} "
              f"{r['ece']:>6.3f} {r['selective_accuracy_80']:>6.3f}")  # fmt: skip
    for r in control:
        print(f"prevalence {r['prevalence']:.1f} {r['control']:<13} risk<={r['target_risk']:.2f} delta "
              f"{r['delta']:.2f}: violations {r['violation_rate']:.3f} (<= {r['delta'] + r['noise_2se']:.3f}: "
              f"{r['within_delta']}) coverage {r['coverage']:.3f}")  # fmt: skip
    return result


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(prevalence_shift_benchmark, as_positional=False)
