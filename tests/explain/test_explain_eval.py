"""``medtransfer explain-eval``: heatmaps scored against boxes (pointing game, IoU), per method, logged to MLflow;
box tables from a CSV's ROI columns or ChestX-ray14's official list."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
from lesions import MEAN, SIZE, STD, _boxes, _centres, _plant
from lightning.pytorch import Trainer
from PIL import Image

from medtransfer.commands.explain_eval import localisation_scores, run_explain_eval
from medtransfer.data.boxes import chestxray14_boxes, read_box_table
from medtransfer.data.tables import CHESTXRAY14_FINDINGS
from medtransfer.entry import main
from medtransfer.errors import DataError


@pytest.fixture(scope="module")
def boxed_images(lesion_model, tmp_path_factory):
    """The lesion model as a checkpoint, and 24 planted test X-rays as PNGs (twice the model's input size,
    so boxes are scaled) with a CSV of their boxes."""
    model, backgrounds = lesion_model
    folder = tmp_path_factory.mktemp("boxed")
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(folder / "lesions.ckpt")
    checkpoint = torch.load(folder / "lesions.ckpt", weights_only=True)
    settings = {"size": SIZE, "channels": 3, "mean": [MEAN] * 3, "std": [STD] * 3, "interpolation": "bilinear"}
    checkpoint["input"] = settings
    torch.save(checkpoint, folder / "lesions.ckpt")  # what a fit's data module records: the input the model expects
    centres = _centres(24, torch.Generator().manual_seed(2))
    images = torch.nn.functional.interpolate(_plant(backgrounds[100:124], centres), scale_factor=2, mode="bilinear")
    rows = ["path,x_min,y_min,x_max,y_max"]
    for i, (image, box) in enumerate(zip(images, _boxes(centres) * 2, strict=True)):
        Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(folder / f"{i}.png")
        rows.append(f"{i}.png," + ",".join(f"{v:.2f}" for v in box))
    rows.append("no_box.png,,,,")  # rows without a box are skipped
    (folder / "boxes.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.mark.slow
def test_scores_each_method_against_the_boxes_and_logs_them_to_mlflow(boxed_images, tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    results = run_explain_eval(str(boxed_images / "boxes.csv"), str(boxed_images / "lesions.ckpt"),
                               methods=["occlusion", "gradcam"], output=tmp_path / "scores.json",
                               tracking_uri=store).scores  # fmt: skip
    by_method = {r["method"]: r for r in results}
    assert by_method["occlusion"]["layer"] == "-" and by_method["gradcam"]["layer"] == "blocks.6"
    assert by_method["occlusion"]["boxes"] == 24 and by_method["occlusion"]["n"] >= 18  # true positives only
    assert by_method["occlusion"]["random_rate"] == pytest.approx((4 * 0.04) ** 2, rel=0.05)
    assert by_method["occlusion"]["hit_rate"] >= 0.5 > by_method["gradcam"]["hit_rate"]  # random: 0.026
    assert by_method["occlusion"]["mean_iou"] > by_method["gradcam"]["mean_iou"]
    assert json.loads((tmp_path / "scores.json").read_text()) == results
    (run,) = mlflow.MlflowClient(store).search_runs(
        [mlflow.MlflowClient(store).get_experiment_by_name("medtransfer-explain").experiment_id]
    )
    assert run.data.metrics["occlusion/hit_rate"] == pytest.approx(by_method["occlusion"]["hit_rate"])


@pytest.mark.slow
def test_command_line(boxed_images, tmp_path, capsys):
    main(["explain-eval", str(boxed_images / "boxes.csv"), str(boxed_images / "lesions.ckpt"), "--methods=[layercam]",
          "--layers=[-3, blocks.4]", f"--output={tmp_path / 's.json'}", f"--tracking_uri=sqlite:///{tmp_path}/m.db",
          "--detected_only=false", "--max_images=6"])  # fmt: skip
    out = capsys.readouterr().out
    assert "hit rate" in out and "blocks.2" in out and "blocks.4" in out
    assert [r["n"] for r in json.loads((tmp_path / "s.json").read_text())] == [6, 6]


def test_localisation_scores_of_known_maps():
    maps = np.zeros((2, 10, 10), np.float32)
    maps[0, 2:4, 2:4] = 1.0  # on the box
    maps[1, 8, 8] = 1.0  # off it
    boxes = np.array([[2, 2, 4, 4], [0, 0, 5, 2]], np.float32)
    scores = localisation_scores(maps, boxes)
    assert scores == {"n": 2, "hit_rate": 0.5, "mean_iou": 0.5, "random_rate": pytest.approx((0.04 + 0.1) / 2)}


def test_box_csv_errors_name_the_line(tmp_path):
    csv = tmp_path / "boxes.csv"
    csv.write_text("path,x_min,y_min,x_max,y_max\na.png,1,2,5,6\nb.png,4,2,3,6\n")
    with pytest.raises(DataError, match=r"boxes.csv line 3: box .* empty or inverted"):
        read_box_table(csv)
    csv.write_text("path,x_min,y_min,x_max\na.png,1,2,5\n")
    with pytest.raises(DataError, match="y_max"):
        read_box_table(csv)


def test_chestxray14_official_boxes_ship_with_torchxrayvision():
    boxes = chestxray14_boxes()
    assert len(boxes) == 984 and boxes["path"].nunique() == 880
    assert set(boxes["finding"]) <= set(CHESTXRAY14_FINDINGS) and boxes["finding"].nunique() == 8
    first = boxes.iloc[0]
    assert first["path"] == "00013118_008.png" and first["finding"] == "Atelectasis"
    assert (first["x_min"], first["x_max"]) == pytest.approx((225.0847, 225.0847 + 86.7797), abs=1e-3)
    assert (boxes[["x_min", "y_min"]] >= 0).all(axis=None) and (boxes[["x_max", "y_max"]] <= 1024).all(axis=None)


@pytest.mark.slow
def test_chestxray14_boxes_are_scored_on_the_images_that_are_here(chestxray14_sample_dir, boxed_images, tmp_path):
    """The sample's 256 px PNGs: boxes drawn on the 1024 px release are scaled; a binary model explains its one
    output for every finding."""
    checkpoint = str(boxed_images / "lesions.ckpt")
    with pytest.raises(DataError, match="needs --image_root"):
        run_explain_eval("chestxray14", checkpoint)
    images = chestxray14_sample_dir / "images"
    (result,) = run_explain_eval("chestxray14", checkpoint, image_root=str(images), methods=["layercam"],
                                 detected_only=False, output=tmp_path / "s.json",
                                 tracking_uri=f"sqlite:///{tmp_path}/m.db").scores  # fmt: skip
    boxes = chestxray14_boxes()
    here = boxes[[(images / name).is_file() for name in boxes["path"]]]
    assert result["boxes"] == result["n"] == len(here) > 0
    share = (here["x_max"] - here["x_min"]) * (here["y_max"] - here["y_min"]) / 1024**2
    assert result["random_rate"] == pytest.approx(share.mean(), rel=1e-3)
