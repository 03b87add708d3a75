"""``medtransfer explain-eval``: heatmaps scored against boxes (pointing game, IoU), per method, logged to MLflow;
box tables from a CSV's ROI columns or ChestX-ray14's official list."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
from faults.untrained import write_untrained_checkpoint
from lesions import MEAN, SIZE, STD, _boxes, _centres, _plant
from lightning.pytorch import Trainer
from PIL import Image

from medtransfer.commands.explain_eval import run_explain_eval
from medtransfer.commands.explain_scores import localisation_scores
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


@pytest.fixture(scope="module")
def small_boxed(pneumonia_npz, tmp_path_factory):
    """Six real 28 px X-rays as 56 px PNGs, with one box each in the PNGs' pixels."""
    folder = tmp_path_factory.mktemp("small_boxed")
    with np.load(pneumonia_npz) as data:
        images = data["test_images"][:6]
    for i, image in enumerate(images):
        Image.fromarray(image).resize((56, 56), Image.Resampling.BILINEAR).save(folder / f"{i}.png")
    return folder


def _scores(boxes_csv, checkpoint, tmp_path, name, **options) -> dict:
    (result,) = run_explain_eval(str(boxes_csv), str(checkpoint), methods=["layercam"], detected_only=False,
                                 output=tmp_path / f"{name}.json", tracking_uri=f"sqlite:///{tmp_path}/m.db",
                                 **options).scores  # fmt: skip
    return result


def test_box_image_size_scales_boxes_drawn_on_other_sized_images(small_boxed, tmp_path):
    """Boxes drawn on 14 px copies of the 56 px files, with ``box_image_size=14``, score as the same boxes in
    the files' own pixels; without the option they are taken as 56 px pixels: a sixteenth of the area."""
    checkpoint = write_untrained_checkpoint(tmp_path / "untrained.ckpt")
    boxes = [(4 + 2 * i, 8, 28 + 2 * i, 40) for i in range(6)]  # in the 56 px files' pixels
    for name, scale in (("native", 1), ("drawn_small", 4)):
        rows = "".join(f"{small_boxed / f'{i}.png'},{','.join(str(v / scale) for v in box)}\n"
                       for i, box in enumerate(boxes))  # fmt: skip
        (tmp_path / f"{name}.csv").write_text("path,x_min,y_min,x_max,y_max\n" + rows)
    native = _scores(tmp_path / "native.csv", checkpoint, tmp_path, "native")
    scaled = _scores(tmp_path / "drawn_small.csv", checkpoint, tmp_path, "scaled", box_image_size=14)
    assert native["n"] == scaled["n"] == 6
    assert scaled == pytest.approx(native, abs=1e-6)
    assert native["random_rate"] == pytest.approx(np.mean([(b[2] - b[0]) * (b[3] - b[1]) / 56**2 for b in boxes]))
    unscaled = _scores(tmp_path / "drawn_small.csv", checkpoint, tmp_path, "unscaled")
    assert unscaled["random_rate"] == pytest.approx(native["random_rate"] / 16)


def test_finding_column_picks_each_boxs_output_and_drops_findings_the_model_lacks(small_boxed, tmp_path, capsys):
    checkpoint = write_untrained_checkpoint(tmp_path / "labels.ckpt", ["Nodule", "Mass", "Effusion"], "multilabel")
    findings = ["Nodule", "mass", "Hernia", "Effusion", "Hernia", "Nodule"]  # matched without regard to case
    rows = "".join(f"{i}.png,{f},4,8,40,44\n" for i, f in enumerate(findings))
    (small_boxed / "findings.csv").write_text("path,lesion,x_min,y_min,x_max,y_max\n" + rows)
    main(["explain-eval", str(small_boxed / "findings.csv"), str(checkpoint), "--methods=[layercam]",
          "--finding_column=lesion", "--detected_only=false", f"--output={tmp_path / 'f.json'}",
          f"--tracking_uri=sqlite:///{tmp_path}/m.db"])  # fmt: skip
    (named,) = json.loads((tmp_path / "f.json").read_text())
    assert named["boxes"] == named["n"] == 4  # the two Hernia boxes: no such output to explain
    top = _scores(small_boxed / "findings.csv", checkpoint, tmp_path, "top")  # no column: every box, top output
    assert top["boxes"] == top["n"] == 6
    (small_boxed / "unknown.csv").write_text("path,lesion,x_min,y_min,x_max,y_max\n0.png,Hernia,4,8,40,44\n")
    with pytest.raises(DataError, match=r"None of the box findings \['Hernia'\] is one of the model's classes"):
        run_explain_eval(str(small_boxed / "unknown.csv"), str(checkpoint), finding_column="lesion")
