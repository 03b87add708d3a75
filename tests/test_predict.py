"""Batch inference: a checkpoint over a folder of real X-ray PNGs to a CSV, matching test-time probabilities."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medtransfer.cli import main
from medtransfer.errors import DataError
from medtransfer.predict import collect_images, load_predictor, run_predict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fitted_checkpoint(tmp_path_factory, pneumonia_npz) -> Path:
    """A checkpoint from a short real fit of the default config (32 px, a few batches)."""
    workdir = tmp_path_factory.mktemp("fit")
    cwd = Path.cwd()
    mp = pytest.MonkeyPatch()
    mp.chdir(workdir)
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.setattr("sys.argv", ["medtransfer"])
    try:
        main([
            "fit", f"--config={REPO / 'configs' / 'pneumonia_effnet_lite0.yaml'}", f"--data.path={pneumonia_npz}",
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--data.image_size=32",
            "--trainer.enable_progress_bar=false", "--test_after_fit=false",
        ])  # fmt: skip
    finally:
        mp.undo()
        assert Path.cwd() == cwd
    return next(workdir.glob("mlruns/*/*/checkpoints/last.ckpt"))


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory, pneumonia_npz) -> tuple[Path, np.ndarray]:
    folder = tmp_path_factory.mktemp("images")
    with np.load(pneumonia_npz) as data:
        images = data["test_images"][:40]
    for i, image in enumerate(images):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray(image).save(sub / f"case{i:02d}.png")
    return folder, images


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_folder_to_csv_matches_the_models_own_probabilities(fitted_checkpoint, png_folder, tmp_path):
    folder, images = png_folder
    result = run_predict(str(folder), str(fitted_checkpoint), output=tmp_path / "out.csv", summary=tmp_path / "s.json")
    rows = _read(tmp_path / "out.csv")
    assert len(rows) == 40 and result["unreadable"] == 0
    model, settings, names = load_predictor(fitted_checkpoint)
    assert names == ["normal", "pneumonia"] and settings["size"] == 32
    # the same images through the data module's own eval pipeline and the model's test-time path
    from medtransfer.data.transforms import build_eval_transform

    transform = build_eval_transform(32, 3, settings["mean"], settings["std"], settings["interpolation"])
    by_name = {Path(r["path"]).name: r for r in rows}
    batch = torch.stack([transform(image=images[i])["image"] for i in range(40)])
    with torch.no_grad():
        expected = model.predict_proba(model(batch))
    for i in range(40):
        row = by_name[f"case{i:02d}.png"]
        assert float(row["prob_pneumonia"]) == pytest.approx(float(expected[i]), abs=1e-5)
        decided = not bool(model.abstains(expected[i : i + 1])[0])
        assert row["decision"] in (("positive", "negative") if decided else ("abstain",))
    assert sum(result["decisions"].values()) == 40 and (tmp_path / "s.json").is_file()


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
    assert len(rows) == 5 and result["unreadable"] == 3
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
    with pytest.raises(KeyboardInterrupt):
        run_predict(str(folder), str(fitted_checkpoint), output=out, batch_size=8)
    monkeypatch.undo()
    assert not out.exists() and list(tmp_path.iterdir()) == []


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
