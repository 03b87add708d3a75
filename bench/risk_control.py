"""Does the abstention guarantee hold? Repeated calibration/evaluation splits of real test predictions.

Binary (PneumoniaMNIST): a trained checkpoint's probabilities on the official test split (624 images) are split
at random into calibration and evaluation halves, ``--splits`` times. On each split the abstention cut-off is
fitted on one half and the selective risk measured on the other, for each (target_risk, delta) pair, by

* ``ltt``: ``decisions.risk_control.control_selective_risk`` (Learn-Then-Test, fixed sequence, exact binomial);
  the share of splits whose selective risk exceeds ``target_risk`` should be at most ``delta`` (up to binomial
  noise over the splits);
* ``point_estimate``: the previous rule, the largest calibration coverage whose empirical risk is at most
  ``target_risk`` (``DecisionFitting._cutoff``), for contrast.

The decision threshold stays the checkpoint's (fitted on validation); confidence is the margin ``|p - t|``.

**Which risk a violation is measured against.** The calibration half is a sample of the 624-image pool, so the
population LTT's guarantee is about is the pool: ``violation_rate`` counts splits where the selective risk *on the
whole pool* at the chosen cut-off exceeds ``target_risk``. ``other_half_violation_rate`` is the earlier measure,
the risk on the evaluation half alone: it adds that half's own sampling noise (about 200 decided cases, a
standard error near 0.018 at a risk of 0.07) to the guarantee's, and the two halves are complementary (a
calibration half with few errors leaves more to the other), so it overstates violations; at (0.10, 0.10) it
exceeded ``delta + 2 se`` while the pool measure does not (``bench/results/risk_control.json``).

Multi-class (ChestX-ray14, 3 classes): the CheXNet reproduction's DenseNet121 probabilities (shared data,
``chexnet_reproduction/preds.csv``) on the official test images labelled with exactly one of Atelectasis,
Effusion, Infiltration, renormalised over those three; split by patient into halves. ``aps`` (MAPIE's APS
quantile, ``fit_aps_quantile``) sets at coverage ``1 - alpha`` against ``naive`` sets (classes ranked down to
cumulative probability ``1 - alpha`` of the uncalibrated scores).

``default_run``: the pipeline's own calibration on the checkpoint: ``calibration_fraction`` 0.5 of validation held
out (``calibration_rows``, seed 0), Youden threshold and certified band fitted there, applied to the test split,
with the exchangeability check of test scores against the calibration scores.

Usage: python bench/risk_control.py --checkpoint PATH [--splits 500] [--out bench/results/risk_control.json]
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medtransfer.data.base import calibration_rows
from medtransfer.data.medmnist import MedMNISTDataModule
from medtransfer.decisions.risk_control import (
    aps_sets,
    calibration_summary,
    check_exchangeability,
    control_selective_risk,
    fit_aps_quantile,
)
from medtransfer.decisions.thresholds import fit_threshold
from medtransfer.metrics import functional as F
from medtransfer.models.classifier import ClassifierModule

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
PAIRS = [(0.05, 0.1), (0.10, 0.1), (0.05, 0.2), (0.02, 0.1)]
ALPHAS = [0.1, 0.05]
FINDINGS = ["Atelectasis", "Effusion", "Infiltration"]


def checkpoint_probs(checkpoint: Path, npz: Path) -> dict[str, np.ndarray]:
    """Validation and test probabilities and labels of ``checkpoint`` on PneumoniaMNIST (its input settings)."""
    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = ClassifierModule.load_from_checkpoint(checkpoint, pretrained="none", map_location="cpu", weights_only=True)
    model.eval()
    settings = raw["input"]
    data = MedMNISTDataModule(
        path=str(npz), image_size=settings["size"], mean=settings["mean"], std=settings["std"],
        interpolation=settings["interpolation"], channels=settings["channels"], batch_size=128,
    )  # fmt: skip
    data.setup("fit")
    out: dict[str, np.ndarray] = {"threshold": np.array(float(model.decision_threshold))}
    with torch.no_grad():
        for split, loader in (("val", data.val_dataloader()), ("test", data.test_dataloader())):
            probs = torch.cat([model.predict_proba(model(x)) for x, _ in loader])
            out[f"{split}_probs"] = probs.numpy()
            out[f"{split}_labels"] = np.concatenate([y.numpy() for _, y in loader])
    return out


def point_estimate_cutoff(confidence: np.ndarray, correct: np.ndarray, target_risk: float) -> float:
    """The rule before risk control: the largest calibration coverage whose empirical risk <= target_risk."""
    _, risk, cutoffs = F.risk_coverage_curve(torch.as_tensor(confidence), torch.as_tensor(correct))
    ok = torch.nonzero(risk <= target_risk + 1e-12)
    return float(cutoffs[int(ok[-1]) if len(ok) else 0])


def _selective(confidence: np.ndarray, correct: np.ndarray, cutoff: float) -> tuple[float, float]:
    decided = confidence >= cutoff
    n = int(decided.sum())
    return n / len(confidence), (float((~correct[decided]).sum()) / n if n else 0.0)


def binary_benchmark(probs: np.ndarray, labels: np.ndarray, threshold: float, splits: int, seed: int) -> list[dict]:
    """LTT and the point estimate over random halves, violations against the pool's and the other half's risk."""
    confidence = np.abs(probs - threshold)
    correct = (probs >= threshold).astype(int) == labels
    rng = np.random.default_rng(seed)
    draws = [rng.permutation(len(probs)) for _ in range(splits)]
    half = len(probs) // 2
    records = []
    for target_risk, delta in PAIRS:
        for method in ("ltt", "point_estimate"):
            risks, pool_risks, coverages, certified = [], [], [], []
            for order in draws:
                cal, ev = order[:half], order[half:]
                if method == "ltt":
                    result = control_selective_risk(confidence[cal], correct[cal], target_risk, delta)
                    cutoff = result.cutoff
                    certified.append(result.certified)
                else:
                    cutoff = point_estimate_cutoff(confidence[cal], correct[cal], target_risk)
                coverage, risk = _selective(confidence[ev], correct[ev], cutoff)
                coverages.append(coverage)
                risks.append(risk)
                pool_risks.append(_selective(confidence, correct, cutoff)[1])
            violations = np.asarray(pool_risks) > target_risk
            noise = 2 * math.sqrt(delta * (1 - delta) / splits)  # two binomial standard errors over the splits
            records.append({
                "dataset": "pneumoniamnist/test", "method": method, "target_risk": target_risk, "delta": delta,
                "violation_rate": round(float(violations.mean()), 4),
                "other_half_violation_rate": round(float((np.asarray(risks) > target_risk).mean()), 4),
                "mean_coverage": round(float(np.mean(coverages)), 4),
                "mean_risk": round(float(np.mean(risks)), 4),
                "certified_share": round(float(np.mean(certified)), 4) if certified else None,
                "within_delta": bool(violations.mean() <= delta + noise),
                "noise_2se": round(noise, 4), "splits": splits, "calibration_cases": half,
            })  # fmt: skip
    return records


def three_class_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Renormalised CheXNet-reproduction probabilities, labels and patients of single-finding test images."""
    folder = DATA / "chexnet_reproduction"
    preds = pd.read_csv(folder / "preds.csv")
    columns = ["Image Index", "Finding Labels", "Patient ID"]
    labels = pd.read_csv(folder / "Data_Entry_2017_v2020.csv.gz", usecols=columns)
    frame = preds.merge(labels, on="Image Index")
    frame = frame[frame["Finding Labels"].isin(FINDINGS)]
    probs = frame[[f"prob_{f}" for f in FINDINGS]].to_numpy(dtype=np.float64)
    probs /= probs.sum(axis=1, keepdims=True)
    target = frame["Finding Labels"].map({f: i for i, f in enumerate(FINDINGS)}).to_numpy()
    return probs, target, frame["Patient ID"].to_numpy()


def naive_sets(probs: np.ndarray, alpha: float) -> np.ndarray:
    """Classes ranked down to cumulative (uncalibrated) probability 1 - alpha: trusts the scores as they are."""
    return aps_sets(probs, 1 - alpha)


def multiclass_benchmark(splits: int, seed: int) -> list[dict]:
    probs, target, patients = three_class_data()
    unique = np.unique(patients)
    rng = np.random.default_rng(seed)
    records = []
    draws = [rng.permutation(unique)[: len(unique) // 2] for _ in range(splits)]
    for alpha in ALPHAS:
        for method in ("aps", "naive"):
            coverages, sizes, decided = [], [], []
            for i, chosen in enumerate(draws):
                cal = np.isin(patients, chosen)
                ev = ~cal
                if method == "aps":
                    sets = aps_sets(probs[ev], fit_aps_quantile(probs[cal], target[cal], alpha, seed=i))
                else:
                    sets = naive_sets(probs[ev], alpha)
                coverages.append(sets[np.arange(ev.sum()), target[ev]].mean())
                sizes.append(sets.sum(axis=1).mean())
                decided.append((sets.sum(axis=1) == 1).mean())
            coverages = np.asarray(coverages)
            records.append({
                "dataset": "chestxray14/test 3-class (CheXNet reproduction)", "method": method, "alpha": alpha,
                "target_coverage": 1 - alpha, "mean_coverage": round(float(coverages.mean()), 4),
                "violation_rate": round(float((coverages < 1 - alpha).mean()), 4),
                "min_coverage": round(float(coverages.min()), 4), "mean_set_size": round(float(np.mean(sizes)), 4),
                "decided_share": round(float(np.mean(decided)), 4), "splits": splits, "cases": len(target),
                "images_per_class": np.bincount(target).tolist(),
            })  # fmt: skip
    return records


def default_run(probs: dict[str, np.ndarray]) -> list[dict]:
    """The pipeline's calibration on the checkpoint's weights, applied to the official test split."""
    val_p, val_y, test_p, test_y = probs["val_probs"], probs["val_labels"], probs["test_probs"], probs["test_labels"]
    rows = calibration_rows(val_y, 0.5, seed=0)
    cal_p, cal_y = val_p[rows], val_y[rows]
    threshold = fit_threshold(torch.as_tensor(cal_p), torch.as_tensor(cal_y), "youden")
    cal_conf, test_conf = np.abs(cal_p - threshold), np.abs(test_p - threshold)
    cal_correct = (cal_p >= threshold).astype(int) == cal_y
    test_correct = (test_p >= threshold).astype(int) == test_y
    summary = calibration_summary(cal_conf, (cal_p >= threshold).astype(int))
    check = check_exchangeability(summary, test_conf, (test_p >= threshold).astype(int))
    out = []
    for target_risk, delta in PAIRS:
        result = control_selective_risk(cal_conf, cal_correct, target_risk, delta)
        coverage, risk = _selective(test_conf, test_correct, result.cutoff)
        out.append({
            "target_risk": target_risk, "delta": delta, "certified": result.certified, "cutoff": result.cutoff,
            "calibration_cases": len(rows), "calibration_coverage": round(result.coverage, 4),
            "risk_bound": round(result.risk_bound, 4), "test_coverage": round(coverage, 4),
            "test_risk": round(risk, 4), "threshold": round(threshold, 4),
            "exchangeability": asdict(check), "exchangeability_message": check.message(),
        })  # fmt: skip
    return out


def risk_control_benchmark(
    checkpoint: Path,
    npz: Path = DATA / "pneumoniamnist.npz",
    splits: int = 500,
    seed: int = 0,
    model_note: str = "",
    out: Path = REPO / "bench" / "results" / "risk_control.json",
) -> dict:
    """Run the binary, multi-class and default-run checks and store them.

    Args:
        checkpoint: a binary PneumoniaMNIST checkpoint (e.g. ``make fit``'s best).
        npz: the PneumoniaMNIST file.
        splits: random calibration/test splits per (target, delta).
        seed: seed of the splits.
        model_note: how the checkpoint was trained, for the record.
        out: where the results go.
    """
    probs = checkpoint_probs(checkpoint, npz)
    result = {
        "model": model_note or str(checkpoint),
        "binary": binary_benchmark(probs["test_probs"], probs["test_labels"], float(probs["threshold"]),
                                   splits, seed),
        "multiclass": multiclass_benchmark(splits, seed),
        "default_run": default_run(probs),
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for record in result["binary"]:
        print(f"{record['method']:<15} risk<={record['target_risk']:.2f} delta {record['delta']:.2f}: "
              f"violations {record['violation_rate']:.3f} (other half {record['other_half_violation_rate']:.3f}) "
              f"coverage {record['mean_coverage']:.3f}")  # fmt: skip
    for record in result["multiclass"]:
        print(f"{record['method']:<15} alpha {record['alpha']:.2f}: coverage {record['mean_coverage']:.4f} "
              f"(below target in {record['violation_rate']:.2f} of splits) "
              f"set size {record['mean_set_size']:.2f}")  # fmt: skip
    for record in result["default_run"]:
        print(f"default run risk<={record['target_risk']} delta {record['delta']}: certified {record['certified']} "
              f"test coverage {record['test_coverage']:.3f} risk {record['test_risk']:.3f}")  # fmt: skip
    print(result["default_run"][0]["exchangeability_message"])
    return result


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(risk_control_benchmark, as_positional=False)
