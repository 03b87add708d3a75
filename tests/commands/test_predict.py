"""Batch inference: a checkpoint over a folder of real X-ray PNGs to a CSV, matching test-time probabilities."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from faults.untrained import write_untrained_checkpoint
from helpers import CONSOLE_SCRIPT, fit_in
from PIL import Image

from medtransfer.commands.fit import build_cli
from medtransfer.commands.predict import collect_images, load_predictor, run_predict
from medtransfer.entry import main
from medtransfer.errors import DataError, MedtransferError
from medtransfer.tracking.callbacks import find_mlflow_logger

REPO = Path(__file__).resolve().parents[2]


CONFIG = REPO / "configs" / "pneumonia_effnet_lite0.yaml"
N_IMAGES = 40


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, pneumonia_npz) -> dict:
    """A short real fit of the default config (32 px, a few batches), its model logged and registered in MLflow.

    Returns the work folder, the MLflow store, the run id and the best checkpoint (the one MLflow holds).
    """
    workdir = tmp_path_factory.mktemp("fit")
    cwd = Path.cwd()
    cli = fit_in(workdir, [
        "fit", f"--config={CONFIG}", f"--data.path={pneumonia_npz}", "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=4", "--data.image_size=32", "--trainer.enable_progress_bar=false",
        "--mlflow_model.registered_model_name=pneumonia-tiny",
    ])  # fmt: skip
    assert Path.cwd() == cwd
    store = f"sqlite:///{workdir}/mlruns/mlflow.db"
    run_id = find_mlflow_logger(cli.trainer).run_id
    return {
        "workdir": workdir,
        "store": store,
        "run_id": run_id,
        "best": workdir / cli.trainer.checkpoint_callback.best_model_path,  # relative to the fit folder
    }


@pytest.fixture(scope="module")
def fitted_checkpoint(fitted) -> Path:
    return fitted["best"]


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory, pneumonia_npz) -> tuple[Path, np.ndarray]:
    folder = tmp_path_factory.mktemp("images")
    with np.load(pneumonia_npz) as data:
        images = data["test_images"][:N_IMAGES]
    for i, image in enumerate(images):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray(image).save(sub / f"case{i:02d}.png")
    return folder, images


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _probabilities(rows: list[dict[str, str]]) -> dict[str, str]:
    return {Path(r["path"]).name: r["prob_pneumonia"] for r in rows}


def test_folder_to_csv_matches_the_test_steps_probabilities(fitted, png_folder, tmp_path, pneumonia_npz):
    folder, _ = png_folder
    result = run_predict(str(folder), str(fitted["best"]), output=tmp_path / "out.csv", summary=tmp_path / "s.json")
    rows = _read(tmp_path / "out.csv")
    assert len(rows) == N_IMAGES and result.unreadable == 0
    predictor = load_predictor(fitted["best"])
    assert predictor.class_names == ["normal", "pneumonia"] and predictor.settings.size == 32
    # `medtransfer test` on the same checkpoint: its first test batch holds the same images, in order
    cli = build_cli([
        "test", f"--config={CONFIG}", f"--data.path={pneumonia_npz}", "--data.image_size=32",
        f"--ckpt_path={fitted['best']}", "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false",
        "--trainer.logger=false", "--trainer.callbacks=[]",
    ])  # fmt: skip
    expected = cli.model.test_outputs["probs"][:N_IMAGES]
    by_name = {Path(r["path"]).name: r for r in rows}
    for i in range(N_IMAGES):
        row = by_name[f"case{i:02d}.png"]
        assert float(row["prob_pneumonia"]) == pytest.approx(float(expected[i]), abs=1e-5)
        referred = bool(predictor.rule.abstains(expected[i : i + 1])[0])
        assert row["decision"] in (("abstain",) if referred else ("positive", "negative"))
        assert row["model"] == str(fitted["best"])
    assert sum(result.decisions.values()) == N_IMAGES
    written = json.loads((tmp_path / "s.json").read_text())  # the summary's keys, in their order, and its values
    assert list(written) == ["images", "predicted", "unreadable", "decisions", "coverage", "images_per_second",
                             "output", "model", "failures", "unlike_training", "heatmaps", "guarantee"]  # fmt: skip
    assert result.findings is None and result.prevalence is None  # keys only multi-label / --prevalence runs have
    assert written == {k: v for k, v in asdict(result).items() if k not in ("findings", "prevalence")}


def test_the_mlflow_model_predicts_exactly_as_the_checkpoint(fitted, png_folder, tmp_path):
    folder, _ = png_folder
    run_predict(str(folder), str(fitted["best"]), output=tmp_path / "ckpt.csv")
    from_checkpoint = _read(tmp_path / "ckpt.csv")
    mlflow.MlflowClient(fitted["store"]).set_registered_model_alias("pneumonia-tiny", "champion", "1")
    for uri, label in [
        (f"runs:/{fitted['run_id']}/model", f"runs:/{fitted['run_id']}/model"),
        ("models:/pneumonia-tiny/1", "models:/pneumonia-tiny/1"),
        ("models:/pneumonia-tiny@champion", "models:/pneumonia-tiny/1"),
    ]:
        out = tmp_path / "uri.csv"
        result = run_predict(str(folder), uri, output=out, tracking_uri=fitted["store"])
        rows = _read(out)
        assert _probabilities(rows) == _probabilities(from_checkpoint), uri
        assert [r["decision"] for r in rows] == [r["decision"] for r in from_checkpoint], uri
        assert {r["model"] for r in rows} == {label} and result.model == label


def test_the_logged_model_carries_its_decision_rule_and_is_registered(fitted):
    client = mlflow.MlflowClient(fitted["store"])
    run = client.get_run(fitted["run_id"])
    assert run.data.tags["model_uri"] == f"runs:/{fitted['run_id']}/model"
    assert run.data.tags["registered_model"] == "models:/pneumonia-tiny/1"
    mlflow.set_tracking_uri(fitted["store"])  # undone after the test (conftest)
    info = mlflow.models.get_model_info("models:/pneumonia-tiny/1")
    checkpoint = torch.load(fitted["best"], weights_only=True)
    assert info.metadata["class_names"] == ["normal", "pneumonia"]
    assert info.metadata["decision"]["threshold"] == pytest.approx(
        float(checkpoint["state_dict"]["decision_threshold"])
    )
    assert info.metadata["input"]["size"] == 32
    assert info.signature is not None and tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (
        -1,
        3,
        32,
        32,
    )


def test_an_unknown_or_foreign_mlflow_model_is_one_clear_error(fitted, png_folder, tmp_path):
    folder, _ = png_folder
    with pytest.raises(DataError, match="Cannot load MLflow model models:/no-such-model/1"):
        run_predict(str(folder), "models:/no-such-model/1", output=tmp_path / "x.csv", tracking_uri=fitted["store"])
    mlflow.set_tracking_uri(fitted["store"])  # undone after the test (conftest)
    with mlflow.start_run() as run:
        mlflow.pytorch.log_model(torch.nn.Linear(2, 1), name="model", input_example=np.zeros((2, 2), np.float32))
    with pytest.raises(DataError, match="not logged by medtransfer"):
        run_predict(str(folder), f"runs:/{run.info.run_id}/model", output=tmp_path / "x.csv",
                    tracking_uri=fitted["store"])  # fmt: skip
    assert not (tmp_path / "x.csv").exists()


def test_bad_files_are_reported_and_skipped(fitted_checkpoint, png_folder, tmp_path):
    folder, _ = png_folder
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("case00.png", "case02.png"):
        (mixed / name).write_bytes((folder / "b" / name).read_bytes())
    (mixed / "empty.png").write_bytes(b"")
    (mixed / "text.jpg").write_text("not an image")
    (mixed / "cut.png").write_bytes((folder / "b" / "case04.png").read_bytes()[:50])
    result = run_predict(str(mixed), str(fitted_checkpoint), output=tmp_path / "out.csv", batch_size=2)
    rows = {Path(r["path"]).name: r for r in _read(tmp_path / "out.csv")}
    assert len(rows) == 5 and result.unreadable == 3
    for name in ("empty.png", "text.jpg", "cut.png"):
        assert rows[name]["decision"] == "error" and name in rows[name]["error"]
    assert rows["case00.png"]["error"] == ""


def test_an_interrupted_run_leaves_no_partial_csv(fitted_checkpoint, png_folder, tmp_path, monkeypatch):
    folder, _ = png_folder
    out = tmp_path / "out.csv"
    calls = {"n": 0}
    original = torch.Tensor.cpu

    def fail_on_second_batch(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(torch.Tensor, "cpu", fail_on_second_batch)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):  # Lightning's exit(1) on a Ctrl-C is turned back into the interrupt
        run_predict(str(folder), str(fitted_checkpoint), output=out, batch_size=8)
    monkeypatch.undo()
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is handler  # a later Ctrl-C still interrupts


def test_devices_are_a_trainer_option_and_rows_keep_the_input_order(fitted_checkpoint, png_folder, tmp_path):
    folder, _ = png_folder
    run_predict(str(folder), str(fitted_checkpoint), output=tmp_path / "p.csv", device="cpu", devices=1, batch_size=7)
    assert [Path(r["path"]) for r in _read(tmp_path / "p.csv")] == collect_images(str(folder))


@pytest.mark.slow
def test_two_processes_write_one_csv_as_a_single_process_does(fitted_checkpoint, png_folder, tmp_path):
    """``--devices 2`` on CPU (``ddp``, gloo): each rank streams its share, rank 0 merges one CSV in input order,
    and only rank 0 prints and writes the summary, with the whole run's counts."""
    if not torch.distributed.is_gloo_available():
        pytest.skip("CPU ddp needs torch's gloo backend")
    folder, _ = png_folder
    mixed = tmp_path / "images"
    shutil.copytree(folder, mixed)
    (mixed / "a" / "broken.png").write_bytes(b"not an image")
    single = run_predict(str(mixed), str(fitted_checkpoint), output=tmp_path / "single.csv", device="cpu", batch_size=7)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    command = [str(CONSOLE_SCRIPT), "predict", str(mixed), str(fitted_checkpoint),
               "--output", "ddp.csv", "--summary", "ddp.json", "--device", "cpu", "--devices", "2",
               "--batch_size", "7"]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("predicted,") == 1 and f"{N_IMAGES} predicted, 1 unreadable" in done.stdout
    rows, expected = _read(tmp_path / "ddp.csv"), _read(tmp_path / "single.csv")
    assert [r["path"] for r in rows] == [r["path"] for r in expected] and len(rows) == N_IMAGES + 1
    for row, same in zip(rows, expected, strict=True):
        assert row["decision"] == same["decision"] and row["error"] == same["error"]
        assert float(row["prob_pneumonia"] or 0) == pytest.approx(float(same["prob_pneumonia"] or 0), abs=1e-5)
    summary = json.loads((tmp_path / "ddp.json").read_text())
    assert summary["decisions"] == single.decisions and summary["unreadable"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.csv", "ddp.json", "images", "single.csv"]


def test_csv_and_glob_inputs(png_folder, tmp_path):
    folder, _ = png_folder
    (tmp_path / "list.csv").write_text("path\n" + "\n".join(str(p) for p in sorted(folder.glob("a/*.png"))) + "\n")
    assert len(collect_images(str(tmp_path / "list.csv"))) == 20
    assert len(collect_images(str(folder / "b" / "*.png"))) == 20
    with pytest.raises(DataError, match="No images at"):
        collect_images(str(tmp_path / "nothing" / "*.png"))


def test_command_line(fitted_checkpoint, png_folder, tmp_path, capsys):
    folder, _ = png_folder
    main(["predict", str(folder), str(fitted_checkpoint), "--output", str(tmp_path / "p.csv")])
    assert "40 predicted, 0 unreadable" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(folder), str(tmp_path / "missing.ckpt")])
    assert exit_info.value.code == 2 and "Checkpoint not found" in capsys.readouterr().err


def test_heatmaps_are_written_for_the_chosen_images(fitted, png_folder, tmp_path):
    folder, _ = png_folder
    everything = run_predict(str(folder), str(fitted["best"]), output=tmp_path / "all.csv", heatmaps=tmp_path / "all")
    rows = _read(tmp_path / "all.csv")
    assert all(Path(r["heatmap"]).is_file() and Path(r["heatmap"]).parent == tmp_path / "all" for r in rows)
    assert len(everything.heatmaps) == N_IMAGES
    overlay = np.asarray(Image.open(rows[0]["heatmap"]))
    assert overlay.shape == (28, 28, 3)  # drawn over the original image, at its size

    run_predict(str(folder), str(fitted["best"]), output=tmp_path / "ab.csv", heatmaps=tmp_path / "ab",
                heatmaps_for="abstain")  # fmt: skip
    for row in _read(tmp_path / "ab.csv"):
        assert bool(row["heatmap"]) == (row["decision"] == "abstain")

    top = run_predict(str(folder), str(fitted["best"]), output=tmp_path / "top.csv", heatmaps=tmp_path / "top",
                      heatmaps_for="top_k", top_k=3)  # fmt: skip
    most_positive = sorted(rows, key=lambda r: float(r["prob_pneumonia"]), reverse=True)[:3]
    expected = {Path(r["path"]).stem for r in most_positive}
    assert {Path(p).stem.split("_", 1)[1] for p in top.heatmaps} == expected
    assert sorted(p.suffix for p in (tmp_path / "top").iterdir()) == [".npy"] * 3 + [".png"] * 3


def test_heatmaps_are_also_written_as_data_with_their_peak_and_box(fitted, png_folder, tmp_path):
    """The raw map (float, at the image's size) and, in the row, its peak and the box of its hot region."""
    folder, _ = png_folder
    run_predict(str(folder), str(fitted["best"]), output=tmp_path / "p.csv", heatmaps=tmp_path / "maps",
                explain_method="layercam", explain_layer="blocks.2")  # fmt: skip
    for row in _read(tmp_path / "p.csv"):
        heat = np.load(row["heatmap_npy"])
        assert heat.shape == (28, 28) and heat.dtype == np.float32 and 0 <= heat.min() <= heat.max() <= 1
        x, y = float(row["peak_x"]), float(row["peak_y"])
        assert heat[round(y), round(x)] == pytest.approx(float(row["peak_value"]), abs=1e-4) == heat.max()
        box = [float(row[f"box_{k}"]) for k in ("x_min", "y_min", "x_max", "y_max")]
        assert 0 <= box[0] <= x < box[2] <= 28 and 0 <= box[1] <= y < box[3] <= 28
        inside, outside = heat[int(box[1]) : int(box[3]), int(box[0]) : int(box[2])], heat.copy()
        outside[int(box[1]) : int(box[3]), int(box[0]) : int(box[2])] = 0
        assert inside.max() == heat.max() and inside.mean() > outside.mean()


def test_unknown_explain_layer_is_one_clear_error(fitted, png_folder, tmp_path):
    folder, _ = png_folder
    with pytest.raises(MedtransferError, match=r"--explain_layer 'layer9'.*blocks\.0, blocks\.1"):
        run_predict(str(folder), str(fitted["best"]), output=tmp_path / "p.csv", heatmaps=tmp_path / "maps",
                    explain_layer="layer9")  # fmt: skip


def test_heatmaps_for_an_mlflow_model_come_from_the_checkpoint_logged_in_its_run(fitted, png_folder, tmp_path):
    folder, _ = png_folder
    local = run_predict(str(folder), str(fitted["best"]), output=tmp_path / "ckpt.csv", heatmaps=tmp_path / "ckpt",
                        heatmaps_for="top_k", top_k=2)  # fmt: skip
    logged = run_predict(str(folder), f"runs:/{fitted['run_id']}/model", output=tmp_path / "mlflow.csv",
                         tracking_uri=fitted["store"], heatmaps=tmp_path / "mlflow", heatmaps_for="top_k",
                         top_k=2)  # fmt: skip
    assert [Path(p).name for p in logged.heatmaps] == [Path(p).name for p in local.heatmaps]
    for ours, theirs in zip(logged.heatmaps, local.heatmaps, strict=True):
        assert np.array_equal(np.asarray(Image.open(ours)), np.asarray(Image.open(theirs)))


def test_speed_options_keep_the_probabilities(fitted, png_folder, tmp_path):
    folder, _ = png_folder
    run_predict(str(folder), str(fitted["best"]), output=tmp_path / "fp32.csv")
    reference = {k: float(v) for k, v in _probabilities(_read(tmp_path / "fp32.csv")).items()}
    for name, options, tolerance in [
        ("channels_last", {"channels_last": True}, 1e-5),
        ("bf16", {"precision": "bf16"}, 2e-2),  # bfloat16 keeps 8 bits of mantissa
    ]:
        run_predict(str(folder), str(fitted["best"]), output=tmp_path / f"{name}.csv", device="cpu", **options)
        probabilities = _probabilities(_read(tmp_path / f"{name}.csv"))
        assert probabilities.keys() == reference.keys(), name
        assert all(abs(float(probabilities[k]) - p) <= tolerance for k, p in reference.items()), name
    with pytest.raises(DataError, match="--precision 16 needs a GPU"):
        run_predict(str(folder), str(fitted["best"]), output=tmp_path / "x.csv", device="cpu", precision="16")


@pytest.mark.slow
def test_compiled_network_gives_the_same_probabilities(fitted, png_folder, tmp_path):
    folder, _ = png_folder
    run_predict(str(folder), str(fitted["best"]), output=tmp_path / "eager.csv")
    run_predict(str(folder), str(fitted["best"]), output=tmp_path / "compiled.csv", compile=True)
    eager, compiled = (_probabilities(_read(tmp_path / f"{n}.csv")) for n in ("eager", "compiled"))
    assert all(abs(float(compiled[k]) - float(v)) <= 1e-5 for k, v in eager.items())


def test_heatmap_column_holds_absolute_paths(fitted_checkpoint, png_folder, tmp_path, monkeypatch):
    folder, _ = png_folder
    monkeypatch.chdir(tmp_path)
    run_predict(str(folder), str(fitted_checkpoint), output=Path("p.csv"), heatmaps=Path("maps"), heatmaps_for="top_k",
                top_k=1)  # fmt: skip
    run_predict(str(folder), str(fitted_checkpoint), output=Path("q.csv"), heatmaps=Path("maps2"))
    paths = [Path(r["heatmap"]) for r in _read(tmp_path / "q.csv")]
    assert all(p.is_absolute() and p.parent == tmp_path / "maps2" and p.is_file() for p in paths)


def test_progress_is_reported_with_images_per_second_in_a_log(fitted_checkpoint, png_folder, tmp_path, capsys,
                                                              monkeypatch):  # fmt: skip
    monkeypatch.setattr("medtransfer.progress.Progress.__init__.__defaults__", (0.0,))  # a line per batch
    run_predict(str(png_folder[0]), str(fitted_checkpoint), output=tmp_path / "p.csv", batch_size=16)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("predict: ")]
    assert len(lines) >= 2 and lines[-1].startswith(f"predict: {N_IMAGES}/{N_IMAGES} images,")
    assert all("images/s" in line for line in lines)


def test_images_unlike_the_training_data_are_flagged(fitted_checkpoint, png_folder, tmp_path, caplog):
    """MR and CT slices (pydicom's test files) and colour photos (scikit-image) against a chest X-ray model."""
    import shutil

    import pydicom.data
    import skimage.data

    other = tmp_path / "other"
    other.mkdir()
    for name in ("MR_small.dcm", "CT_small.dcm"):
        shutil.copy(pydicom.data.get_testdata_files(name)[0], other / name)
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(skimage.data, name)()).save(other / f"{name}.png")
    reference = torch.load(fitted_checkpoint, weights_only=True)["input"]["reference"]
    assert reference["statistics"] == ["mean", "std", "colour", "dark", "edges"]

    with caplog.at_level("WARNING", logger="medtransfer.commands.predict"):
        result = run_predict(str(other), str(fitted_checkpoint), output=tmp_path / "other.csv")
    rows = _read(tmp_path / "other.csv")
    flagged = {Path(r["path"]).name: r["unlike_training"] for r in rows}
    assert all(flagged.values()), flagged  # each names the statistics out of range
    assert result.unlike_training == 5 and "5 of 5 image(s) are unlike" in caplog.text

    xrays = run_predict(str(png_folder[0]), str(fitted_checkpoint), output=tmp_path / "xrays.csv")
    assert xrays.unlike_training <= 1  # held-out X-rays of the same collection pass (1 of 40 tolerated)


def test_a_csv_input_reads_its_paths_from_the_column_named_by_path_column(png_folder, tmp_path, capsys):
    """``--path_column image``: the paths come from that column (relative ones from the CSV's folder), in the
    table's order; a ``path`` column beside it is ignored, and without the option its absence is the error."""
    folder, _ = png_folder
    checkpoint = write_untrained_checkpoint(tmp_path / "untrained.ckpt")
    chosen = sorted(folder.glob("a/*.png"))[:4] + sorted(folder.glob("b/*.png"))[:2]
    table = tmp_path / "table"
    shutil.copytree(folder, table / "scans")
    relative = [Path("scans") / p.relative_to(folder) for p in reversed(chosen)]  # not the folder's order
    decoys = "".join(f"{tmp_path / 'no-such'}/{i}.png,{rel}\n" for i, rel in enumerate(relative))
    (table / "list.csv").write_text("path,image\n" + decoys)
    main(["predict", str(table / "list.csv"), str(checkpoint), "--path_column", "image",
          "--output", str(tmp_path / "p.csv")])  # fmt: skip
    assert "6 predicted, 0 unreadable" in capsys.readouterr().out
    rows = _read(tmp_path / "p.csv")
    assert [Path(r["path"]) for r in rows] == [table / rel for rel in relative]
    run_predict(str(folder), str(checkpoint), output=tmp_path / "folder.csv")  # the same files, found by a scan
    by_name = _probabilities(_read(tmp_path / "folder.csv"))
    assert all(r["error"] == "" for r in rows)  # batches of another size may round the last digits otherwise
    assert [float(r["prob_pneumonia"]) for r in rows] == pytest.approx(
        [float(by_name[Path(r["path"]).name]) for r in rows], abs=1e-6
    )

    (table / "bare.csv").write_text("image\n" + "".join(f"{rel}\n" for rel in relative))
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(table / "bare.csv"), str(checkpoint), "--output", str(tmp_path / "x.csv")])
    assert exit_info.value.code == 2 and "'path'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def many_pngs(tmp_path_factory, pneumonia_npz) -> Path:
    """120 real test X-rays: enough cases to estimate a prevalence from (``MIN_CASES``)."""
    folder = tmp_path_factory.mktemp("many")
    with np.load(pneumonia_npz) as data:
        for i, image in enumerate(data["test_images"][:120]):
            Image.fromarray(image).save(folder / f"case{i:03d}.png")
    return folder


def test_prevalence_adapts_the_csv_and_reports_the_shares(fitted_checkpoint, many_pngs, tmp_path, capsys):
    """``--prevalence 0.3`` re-weights each probability by Bayes' rule from the calibration shares and reports the
    shares in the summary line and JSON; ``estimate`` with nothing to estimate from says so; ``none`` writes no
    such block."""
    main(["predict", str(many_pngs), str(fitted_checkpoint), "--output", str(tmp_path / "plain.csv"),
          "--summary", str(tmp_path / "plain.json")])  # fmt: skip
    assert "prevalence" not in json.loads((tmp_path / "plain.json").read_text())
    plain = _read(tmp_path / "plain.csv")
    probs = torch.tensor([float(r["prob_pneumonia"]) for r in plain], dtype=torch.float64)
    assert len(set(probs.tolist())) == len(probs)  # no tie block: float64 probabilities, every digit written
    source = torch.tensor(load_predictor(fitted_checkpoint).calibration["prevalence"], dtype=torch.float64)

    main(["predict", str(many_pngs), str(fitted_checkpoint), "--output", str(tmp_path / "given.csv"),
          "--summary", str(tmp_path / "given.json"), "--prevalence", "0.3"])  # fmt: skip
    block = json.loads((tmp_path / "given.json").read_text())["prevalence"]
    assert block["method"] == "given" and block["adapted"] and block["estimated"] == {"normal": 0.7, "pneumonia": 0.3}
    assert (
        block["interval"]["pneumonia"] == [0.3, 0.3] and "prevalence (given): normal 0.700" in capsys.readouterr().out
    )
    adapted = torch.tensor([float(r["prob_pneumonia"]) for r in _read(tmp_path / "given.csv")], dtype=torch.float64)
    odds = (probs / (1 - probs)) * (0.3 / source[1]) / (0.7 / source[0])
    torch.testing.assert_close(adapted, odds / (1 + odds))
    assert json.loads((tmp_path / "given.json").read_text())["decisions"] == dict(
        Counter(r["decision"] for r in _read(tmp_path / "given.csv"))
    )

    # this 4-batch model is too weak to estimate from: its estimate is at the boundary, so it warns and adapts
    # nothing (the estimate itself is tested on data from a known model in tests/decisions/test_prevalence.py)
    main(["predict", str(many_pngs), str(fitted_checkpoint), "--output", str(tmp_path / "est.csv"),
          "--summary", str(tmp_path / "est.json"), "--prevalence", "estimate"])  # fmt: skip
    assert json.loads((tmp_path / "est.json").read_text())["prevalence"] == {"method": "em", "adapted": False}
    assert _read(tmp_path / "est.csv") == plain

    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(many_pngs), str(fitted_checkpoint), "--prevalence", "most"])
    assert exit_info.value.code == 2 and "--prevalence most: expected none, estimate" in capsys.readouterr().err


def test_too_few_images_to_estimate_from_keep_the_model_probabilities(fitted_checkpoint, png_folder, tmp_path,
                                                                     caplog):  # fmt: skip
    folder, _ = png_folder  # 40 images, fewer than MIN_CASES
    run_predict(str(folder), str(fitted_checkpoint), output=tmp_path / "plain.csv")
    with caplog.at_level("WARNING"):
        result = run_predict(str(folder), str(fitted_checkpoint), output=tmp_path / "est.csv", prevalence="estimate")
    assert result.prevalence == {"method": "em", "adapted": False}
    assert "batch of 40 case(s) is too small" in caplog.text
    assert _read(tmp_path / "est.csv") == _read(tmp_path / "plain.csv")
