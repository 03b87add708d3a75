"""Selective prediction on the default run: how accurate is the model on the cases it does not refer?

Loads a checkpoint of ``configs/pneumonia_effnet_lite0.yaml`` (default: the newest best checkpoint under
``mlruns/``; run ``make fit`` first), fits the decision threshold (Youden, or fixed 0.5) and the abstention
band for 60/80/90 % coverage on the **validation** split exactly as ``test`` does, with raw and with
temperature-scaled probabilities, and reports the test split's achieved coverage and selective accuracy.

Usage: python bench/selective.py [--ckpt PATH] [--out bench/results/selective.json]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medtransfer.data.medmnist import MedMNISTDataModule
from medtransfer.decisions.fitting import DecisionFitting
from medtransfer.decisions.temperature import fit_temperature
from medtransfer.decisions.thresholds import fit_threshold
from medtransfer.models.classifier import ClassifierModule

REPO = Path(__file__).resolve().parents[1]
COVERAGES = (0.6, 0.8, 0.9)


def newest_best_checkpoint() -> Path:
    candidates = sorted((REPO / "mlruns").glob("*/*/checkpoints/epoch=*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise SystemExit("No checkpoint under mlruns/: run `make fit` first, or pass --ckpt.")
    return candidates[-1]


@torch.no_grad()
def split_logits(model: ClassifierModule, datamodule: MedMNISTDataModule, split: str) -> tuple[torch.Tensor, ...]:
    loader = torch.utils.data.DataLoader(datamodule.datasets[split], batch_size=256)
    logits, targets = zip(*[(model(x), y) for x, y in loader], strict=True)
    return torch.cat(logits), torch.cat(targets)


def run(ckpt: Path) -> list[dict]:
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = ClassifierModule.load_from_checkpoint(ckpt, pretrained="none", map_location="cpu", weights_only=True).eval()
    skip = ("path", "root", "_instantiator")  # the data is found through $MEDTRANSFER_DATA_DIR here
    data_hparams = {
        k: v for k, v in checkpoint["datamodule_hyper_parameters"].items() if k not in skip and not k.startswith("_")
    }
    spec = model.input_spec  # as the CLI links it to the data module
    backbone_config = {"mean": spec.mean, "std": spec.std, "interpolation": spec.interpolation}
    datamodule = MedMNISTDataModule(**{**data_hparams, **backbone_config})
    stored = float(checkpoint["state_dict"]["decision_threshold"])
    datamodule.setup("test")
    (val_logits, val_y), (test_logits, test_y) = (split_logits(model, datamodule, s) for s in ("val", "test"))
    refit = fit_threshold(model.predict_proba(val_logits), val_y, "youden")
    print(f"threshold stored in the checkpoint {stored:.4f}, re-fitted here on validation {refit:.4f}")
    rows = []
    for calibration in ("raw", "temperature"):
        temperature = fit_temperature(val_logits, val_y, "binary") if calibration == "temperature" else 1.0
        model.temperature.fill_(temperature)
        val_p, test_p = model.predict_proba(val_logits), model.predict_proba(test_logits)
        for policy in ("youden", "fixed"):
            model.decision_threshold.fill_(fit_threshold(val_p, val_y, policy))
            test_correct = model.decide(test_p) == test_y
            for coverage in COVERAGES:
                fitting = DecisionFitting("binary", target_coverage=coverage)
                model.min_confidence.copy_(fitting.fit_min_confidence(model.decision_rule, val_p, val_y)[0])
                decided = ~model.abstains(test_p)
                rows.append(
                    {
                        "probabilities": calibration,
                        "temperature": round(temperature, 4),
                        "threshold_policy": policy,
                        "threshold": round(float(model.decision_threshold), 4),
                        "target_coverage": coverage,
                        "val_coverage": round(float((~model.abstains(val_p)).float().mean()), 4),
                        "test_coverage": round(float(decided.float().mean()), 4),
                        "test_selective_acc": round(float(test_correct[decided].float().mean()), 4),
                        "test_acc_full": round(float(test_correct.float().mean()), 4),
                    }
                )
    return rows


def selective_benchmark(
    ckpt: Path | None = None,
    out: Path = REPO / "bench" / "results" / "selective.json",
) -> dict:
    """Fit threshold and abstention band on validation, report test coverage and selective accuracy, store them.

    Args:
        ckpt: checkpoint of the default config (default: the newest best checkpoint under ``mlruns/``).
        out: where the results go.
    """
    ckpt = ckpt or newest_best_checkpoint()
    rows = run(ckpt)
    header = ("probs", "T", "policy", "threshold", "target cov", "val cov", "test cov", "test sel. acc", "test acc")
    print(f"checkpoint: {ckpt}")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join(str(v) for v in (r["probabilities"], r["temperature"], r["threshold_policy"], r["threshold"],
                                          r["target_coverage"], r["val_coverage"], r["test_coverage"],
                                          r["test_selective_acc"], r["test_acc_full"])))  # fmt: skip
    result = {"checkpoint": str(ckpt), "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(selective_benchmark, as_positional=False)
