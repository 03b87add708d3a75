"""``medtransfer predict --prevalence`` on PneumoniaMNIST's official test split, scored from the CSV alone.

The checkpoint is first re-fitted on validation with the current defaults (temperature scaling, class shares in
the calibration record; weights unchanged), then ``predict`` runs over the 624 test images with ``--prevalence
none``, ``estimate`` (``em`` and ``bbse``) and the true share (an oracle, for reference). No test label is used
by any method; they only score the CSVs: accuracy of ``prediction``, ECE (15 equal bins) of the probability the
CSV states for each decision, selective accuracy at 80 % coverage ranked by that probability and by the
abstention band's own confidence, and the share of distinct confidences.

The choice of estimator is made on validation only: the validation outputs resampled to prevalences 0.1-0.9.

    python bench/prevalence_predict.py --checkpoint CKPT  # -> bench/results/prevalence_predict.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Trainer
from PIL import Image
from prevalence_shift import ece, selective_accuracy  # bench/prevalence_shift.py: the same scores

from medtransfer.commands.predict import run_predict
from medtransfer.commands.predictor import load_predictor
from medtransfer.data.medmnist import MedMNISTDataModule, default_data_dir
from medtransfer.decisions.prevalence import estimate_prevalence
from medtransfer.models.classifier import ClassifierModule

RESULTS = Path(__file__).parent / "results" / "prevalence_predict.json"


def recalibrate(checkpoint: Path, out: Path, npz: Path) -> None:
    """The checkpoint's weights with temperature, rule and calibration record fitted again on validation."""
    model = ClassifierModule.load_from_checkpoint(
        checkpoint, pretrained="none", temperature_scaling=True, confidence_score="decision_prob"
    )
    data = MedMNISTDataModule(flag="pneumoniamnist", path=str(npz), input_spec=model.trained_input)
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, accelerator="cpu")
    trainer.validate(model, datamodule=data, verbose=False)
    trainer.save_checkpoint(out, weights_only=True)


def score(csv_path: Path, labels: np.ndarray, checkpoint: Path) -> dict[str, float]:
    """Accuracy, ECE, selective accuracy at 80 % (stated probability; band confidence) and distinct confidences."""
    import pandas as pd

    frame = pd.read_csv(csv_path)
    order = frame["path"].map(lambda p: int(Path(p).stem))
    frame = frame.assign(index=order).sort_values("index")
    p = frame["prob_pneumonia"].to_numpy(np.float64)
    predicted = (frame["prediction"] == "pneumonia").to_numpy()
    correct = predicted == labels.astype(bool)
    stated = np.where(predicted, p, 1 - p)
    band = load_predictor(checkpoint).rule.confidence(torch.from_numpy(p)).numpy()
    return {
        "accuracy": float(correct.mean()),
        "accuracy_at_half": float(((p >= 0.5) == labels.astype(bool)).mean()),  # not the rule's: for reference
        "ece": ece(stated, correct),
        "selective_acc_at_80_stated": selective_accuracy(stated, correct),
        "selective_acc_at_80_band": selective_accuracy(band, correct),
        "distinct_confidences": len(np.unique(stated)) / len(stated),
        "coverage": float((frame["decision"] != "abstain").mean()),
    }


def validation_choice(checkpoint: Path, npz: Path, seeds: int) -> dict[str, dict[str, float]]:
    """Mean absolute error of each estimator on validation outputs resampled to prevalences 0.1-0.9."""
    model = ClassifierModule.load_from_checkpoint(checkpoint, pretrained="none")
    data = MedMNISTDataModule(flag="pneumoniamnist", path=str(npz), input_spec=model.trained_input)
    data.setup("validate")
    model.eval()
    logits, targets = [], []
    with torch.no_grad():
        for x, y in data.val_dataloader():
            logits.append(model(x))
            targets.append(y)
    probs, y = model.predict_proba(torch.cat(logits)), torch.cat(targets).numpy()
    record = model.calibration
    source, confusion = torch.tensor(record["prevalence"]), torch.tensor(record["confusion"])
    errors: dict[str, dict[str, float]] = {"em": {}, "bbse": {}}
    rng = np.random.default_rng(0)
    positives, negatives = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    for share in np.round(np.arange(0.1, 0.91, 0.1), 1):
        for method in errors:
            found = []
            for _ in range(seeds):
                n_pos = int(share * 300 + 0.5)
                rows = np.concatenate([rng.choice(positives, n_pos), rng.choice(negatives, 300 - n_pos)])
                result = estimate_prevalence(probs[rows], source, "binary", method, confusion, n_bootstrap=1)
                found.append(abs(float(result.estimated[1]) - n_pos / 300) if result is not None else float("nan"))
            errors[method][str(share)] = float(np.nanmean(found))
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--images", type=int, default=624, help="test images used (all 624 by default)")
    parser.add_argument("--seeds", type=int, default=20, help="resamples per prevalence for the validation choice")
    args = parser.parse_args()
    npz = default_data_dir() / "pneumoniamnist.npz"
    with np.load(npz) as arrays:
        images, labels = arrays["test_images"][: args.images], arrays["test_labels"][: args.images, 0]
    results: dict = {"checkpoint": args.checkpoint.name, "test_prevalence": float(labels.mean())}
    with tempfile.TemporaryDirectory() as work:
        folder, model = Path(work) / "images", Path(work) / "recalibrated.ckpt"
        folder.mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(folder / f"{i:04d}.png")
        recalibrate(args.checkpoint, model, npz)
        predictor = load_predictor(model)
        results["temperature"] = float(predictor.network.temperature)
        results["threshold"] = float(predictor.rule.threshold)
        results["validation_mae"] = validation_choice(model, npz, args.seeds)
        runs = {"none": ("none", "em"), "em": ("estimate", "em"), "bbse": ("estimate", "bbse"),
                "oracle": (str(round(float(labels.mean()), 4)), "em")}  # fmt: skip
        for name, (prevalence, method) in runs.items():
            csv_path = Path(work) / f"{name}.csv"
            summary = run_predict(str(folder), str(model), output=csv_path, prevalence=prevalence,
                                  prevalence_method=method)  # fmt: skip
            results[name] = {**score(csv_path, labels, model), "prevalence": summary.prevalence}
    print(f"{'run':8} {'prev':>6} {'acc':>6} {'ece':>6} {'sel80':>6} {'band80':>6} {'distinct':>8}")
    for name in runs:
        row = results[name]
        share = (row["prevalence"] or {}).get("estimated", {}).get("pneumonia", float("nan"))
        print(f"{name:8} {share:6.3f} {row['accuracy']:6.3f} {row['ece']:6.3f} {row['selective_acc_at_80_stated']:6.3f}"
              f" {row['selective_acc_at_80_band']:6.3f} {row['distinct_confidences']:8.3f}")  # fmt: skip
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
