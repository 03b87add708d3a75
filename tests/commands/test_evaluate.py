"""``medtransfer evaluate`` on a peer's real results: the CheXNet reproduction joined to the official labels (and,
with ``--model --prevalence``, adapted to another share of effusions)."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from faults.untrained import write_untrained_checkpoint
from torchmetrics.functional.classification import multiclass_auroc

from medtransfer.commands.evaluate import (
    CHESTXRAY14_FINDINGS,
    evaluate_predictions,
    join_on_ids,
    read_labels,
    read_predictions,
    run_evaluate,
)
from medtransfer.decisions.fitting import DecisionFitting
from medtransfer.entry import main
from medtransfer.errors import DataError

LABELS_GZ = "Data_Entry_2017_v2020.csv.gz"
SMALL_ROWS = 2000
SELECTIVE = ["sel_acc_80", "sel_acc_90", "sel_acc_95"]


@pytest.fixture(scope="module")
def chexnet_report(chexnet_dir) -> pd.DataFrame:
    """The report on all 22,433 test images of the CheXNet reproduction."""
    return run_evaluate(chexnet_dir / "preds.csv", chexnet_dir / LABELS_GZ).report


@pytest.fixture(scope="module")
def small(chexnet_dir, tmp_path_factory) -> SimpleNamespace:
    """The first rows of the real predictions and their rows of the real label file, verbatim, as line lists."""
    preds = (chexnet_dir / "preds.csv").read_text().splitlines()[: SMALL_ROWS + 1]
    ids = {line.split(",", 1)[0] for line in preds[1:]}
    with gzip.open(chexnet_dir / LABELS_GZ, "rt") as stream:
        all_labels = stream.read().splitlines()
    labels = [all_labels[0], *(line for line in all_labels[1:] if line.split(",", 1)[0] in ids)]
    folder = tmp_path_factory.mktemp("small")
    return SimpleNamespace(
        preds=preds,
        labels=labels,
        preds_path=_write(folder / "preds.csv", preds),
        labels_path=_write(folder / "labels.csv", labels),
    )


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _set_field(lines: list[str], line: int, column: int, value: str) -> list[str]:
    """A copy of ``lines`` with field ``column`` (0-based) of file line ``line`` (1-based, header = 1) replaced."""
    lines = list(lines)
    fields = lines[line - 1].split(",")
    fields[column] = value
    lines[line - 1] = ",".join(fields)
    return lines


# ------------------------------------------------------------------------------------- the real CheXNet results
def test_chexnet_auroc_reproduces_published_table(chexnet_report, chexnet_dir):
    published = pd.read_csv(chexnet_dir / "aucs.csv").set_index("label")["auc"]
    per_finding = chexnet_report.drop(index="mean")
    assert sorted(per_finding.index) == sorted(published.index) == sorted(CHESTXRAY14_FINDINGS)
    delta = (per_finding["auroc"] - published).abs()
    print(f"max |AUROC - published| over 14 findings: {delta.max():.2e} ({delta.idxmax()})")
    assert (delta < 1e-4).all(), delta.sort_values(ascending=False)
    assert chexnet_report.loc["mean", "auroc"] == pytest.approx(published.mean(), abs=1e-4)
    assert (per_finding["n"] == 22433).all()
    assert (per_finding["positives"] > 0).all()


def test_chexnet_report_has_selective_and_calibration_columns_in_range(chexnet_report):
    report = chexnet_report.drop(index="mean")
    for column in ["aurc", "ece", "accuracy", *SELECTIVE]:
        assert report[column].between(0, 1).all(), column
    # A useful model: refusing its least confident cases helps, and its ranking beats a constant confidence.
    assert (report["sel_acc_80"] >= report["accuracy"]).all()
    assert (report["aurc"] < 1 - report["accuracy"]).all()
    means = report[["aurc", "ece", "accuracy", *SELECTIVE]].mean()
    assert np.allclose(chexnet_report.loc["mean", means.index].astype(float), means)


def test_chexnet_aurc_agrees_with_a_per_case_reference(chexnet_dir, chexnet_report):
    """AURC against the per-case mean of selective risks (differs by O(log N / N)), computed with numpy here."""
    ids, class_names, probs = read_predictions(chexnet_dir / "preds.csv")
    label_ids, targets = read_labels(chexnet_dir / LABELS_GZ, class_names)
    targets = targets[pd.Index(label_ids).get_indexer(ids)]
    k = class_names.index("Effusion")
    p, y = probs[:, k], targets[:, k]
    errors = ((p >= 0.5).astype(int) != y)[np.argsort(-np.abs(p - 0.5), kind="stable")]
    reference = np.mean(np.cumsum(errors) / np.arange(1, len(errors) + 1))
    assert chexnet_report.loc["Effusion", "aurc"] == pytest.approx(reference, abs=1e-3)


def test_read_labels_handles_the_official_file_and_its_header_quirk(chexnet_dir):
    start = time.perf_counter()
    ids, targets = read_labels(chexnet_dir / LABELS_GZ, list(CHESTXRAY14_FINDINGS))
    elapsed = time.perf_counter() - start
    print(f"read 112,120 label rows in {elapsed:.2f} s")
    assert elapsed < 5
    assert targets.shape == (112120, 14)
    # 'OriginalImage[Width,Height]' names two columns: the ids must not be shifted into the index.
    assert ids[:2].tolist() == ["00000001_000.png", "00000001_001.png"]
    found = [CHESTXRAY14_FINDINGS[k] for k in np.flatnonzero(targets[1])]
    assert found == ["Cardiomegaly", "Emphysema"]


# ----------------------------------------------------------------------------------------- the CLI (jsonargparse)
def test_main_writes_csv_and_json(small, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("medtransfer.commands.evaluate.PROGRESS_ROWS", 1)  # as for a large file
    out = tmp_path / "report"
    main(["evaluate", str(small.preds_path), str(small.labels_path), "--out_dir", str(out)])
    assert sorted(path.name for path in out.iterdir()) == ["evaluation.csv", "evaluation.json"]  # no temp files
    table = pd.read_csv(out / "evaluation.csv", index_col="class")
    summary = json.loads((out / "evaluation.json").read_text())
    assert summary["task"] == "multilabel"
    assert [row["class"] for row in summary["classes"]] == [*CHESTXRAY14_FINDINGS, "mean"]
    assert summary["classes"][-1]["positives"] is None  # NaN is written as null, keeping the JSON valid
    from_json = pd.DataFrame(summary["classes"]).set_index("class")
    assert np.allclose(from_json[["auroc", "aurc", "ece", *SELECTIVE]], table[["auroc", "aurc", "ece", *SELECTIVE]])
    assert (table["n"] == SMALL_ROWS).all()
    captured = capsys.readouterr()
    assert "Pleural_Thickening" in captured.out and "acc@95" in captured.out
    # where a long evaluation stands, with its rate, on stderr (the table stays alone on stdout)
    assert f"{SMALL_ROWS:,} images read and joined" in captured.err and "images/s" in captured.err
    assert "scored in" in captured.err


def test_main_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out_dir", "--id_column", "--prob_prefix", "--label_format", "--task", "chestxray14"):
        assert option in text
    assert "Every id must have a row in the labels file" in " ".join(text.split())  # from the docstring


def test_main_reports_a_missing_file_in_one_line(small, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(tmp_path / "nope.csv"), str(small.labels_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"medtransfer: error: predictions file {tmp_path / 'nope.csv'} does not exist\n"


def test_main_reports_a_bad_probability_in_one_line(small, tmp_path, capsys):
    bad = _write(tmp_path / "preds.csv", _set_field(small.preds, line=7, column=10, value="1.5"))
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(bad), str(small.labels_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"medtransfer: error: {bad} line 7, column 'prob_Edema': the probability 1.5 is outside")


# ------------------------------------------------------------------------------------------------ bad input
def test_prediction_without_a_label_row(small, tmp_path):
    preds = _write(tmp_path / "preds.csv", _set_field(small.preds, line=3, column=0, value="99999999_999.png"))
    with pytest.raises(DataError, match=rf"1 of {SMALL_ROWS} ids in .*preds\.csv have no row in .*'99999999_999\.png'"):
        run_evaluate(preds, small.labels_path)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("1.5", r"the probability 1\.5 is outside \[0, 1\]"),
        ("-0.01", r"the probability -0\.01 is outside \[0, 1\]"),
        ("nan", r"the probability is NaN"),
        ("NaN", r"the probability is NaN"),
        ("", r"the probability is empty"),
        ("high", r"'high' is not a number"),
    ],
)
def test_bad_probability_names_line_and_column(small, tmp_path, value, problem):
    preds = _write(tmp_path / "preds.csv", _set_field(small.preds, line=4, column=5, value=value))
    with pytest.raises(DataError, match=rf"preds\.csv line 4, column 'prob_Mass': {problem}"):
        read_predictions(preds)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("Pneumonai", r"unknown finding 'Pneumonai' \(did you mean 'Pneumonia'\?\)"),
        ("Mass|pleural thickening", r"unknown finding 'pleural thickening'"),
        ("", r"empty finding \(write 'No Finding' for none\)"),
        ("No Finding|Mass", r"'No Finding\|Mass' lists findings and 'No Finding'"),
    ],
)
def test_bad_finding_names_line_and_value(small, tmp_path, value, problem):
    labels = _write(tmp_path / "labels.csv", _set_field(small.labels, line=5, column=1, value=value))
    with pytest.raises(DataError, match=rf"labels\.csv line 5, column 'Finding Labels': {problem}"):
        run_evaluate(small.preds_path, labels)


@pytest.mark.parametrize("which", ["preds", "labels"])
def test_duplicated_ids_are_named(small, tmp_path, which):
    lines = getattr(small, which)
    duplicate = lines[2].split(",", 1)[0]
    path = _write(tmp_path / f"{which}.csv", [*lines, lines[2]])
    paths = {"preds": small.preds_path, "labels": small.labels_path, which: path}
    with pytest.raises(DataError, match=rf"1 duplicated id\(s\) .*'{duplicate}' on lines \[3, {len(lines) + 1}\]"):
        run_evaluate(paths["preds"], paths["labels"])


def test_empty_and_header_only_files(small, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match=r"predictions file .*empty\.csv is empty"):
        read_predictions(empty)
    header_only = _write(tmp_path / "header.csv", small.labels[:1])
    with pytest.raises(DataError, match=r"labels file .*header\.csv has a header but no data rows"):
        read_labels(header_only, ["Mass"])


def test_missing_columns_are_named(small):
    with pytest.raises(DataError, match=r"has no column 'image_id'"):
        read_predictions(small.preds_path, id_column="image_id")
    with pytest.raises(DataError, match=r"has no probability column: expected columns named 'p_'"):
        read_predictions(small.preds_path, prob_prefix="p_")
    with pytest.raises(DataError, match=r"class 'Pneumothoraxx' .* is not a ChestX-ray14 finding"):
        read_labels(small.labels_path, ["Pneumothoraxx"])


# ---------------------------------------------------------------------------------------- other label formats
def test_columns_format_gives_the_same_report(small, tmp_path):
    _, class_names, _ = read_predictions(small.preds_path)
    label_ids, targets = read_labels(small.labels_path, class_names)
    table = pd.DataFrame(targets, columns=class_names)
    table.insert(0, "Image Index", label_ids)
    columns_path = tmp_path / "columns.csv"
    table.iloc[::-1].to_csv(columns_path, index=False)  # another order: the join must not care
    expected = run_evaluate(small.preds_path, small.labels_path).report
    pd.testing.assert_frame_equal(run_evaluate(small.preds_path, columns_path, label_format="columns").report, expected)

    bad = table.astype(str)
    bad.loc[3, "Hernia"] = "yes"
    bad.to_csv(columns_path, index=False)
    with pytest.raises(
        DataError, match=r"columns\.csv line 5, column 'Hernia': expected a label 0 or 1, but got 'yes'"
    ):
        read_labels(columns_path, class_names, label_format="columns")


def test_binary_task_on_one_finding_matches_the_multilabel_row(small, tmp_path):
    ids, class_names, probs = read_predictions(small.preds_path)
    label_ids, targets = read_labels(small.labels_path, class_names)
    k = class_names.index("Effusion")
    preds_path, labels_path = tmp_path / "preds.csv", tmp_path / "labels.csv"
    pd.DataFrame({"Image Index": ids, "prob_Effusion": probs[:, k]}).to_csv(preds_path, index=False)
    pd.DataFrame({"Image Index": label_ids, "label": targets[:, k]}).to_csv(labels_path, index=False)
    binary = run_evaluate(preds_path, labels_path, label_format="single", task="binary").report
    multilabel = run_evaluate(small.preds_path, small.labels_path).report
    assert binary.index.tolist() == ["Effusion", "mean"]
    pd.testing.assert_series_equal(binary.loc["Effusion"], multilabel.loc["Effusion"])

    pd.DataFrame({"Image Index": label_ids, "label": targets[:, k] + 2}).to_csv(labels_path, index=False)
    with pytest.raises(DataError, match=r"labels\.csv line 2, column 'label': unknown label '2'; expected 0, 1"):
        read_labels(labels_path, ["Effusion"], label_format="single")


def test_multiclass_one_vs_rest_auroc_is_torchmetrics(tmp_path):
    generator = np.random.default_rng(0)
    target = generator.integers(0, 3, size=300)
    logits = generator.normal(size=(300, 3)) + 1.5 * np.eye(3)[target]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    names = ["normal", "bacterial", "viral"]
    report = evaluate_predictions(probs, target, names, task="multiclass")
    expected = multiclass_auroc(torch.from_numpy(probs), torch.from_numpy(target), num_classes=3, average=None)
    assert np.allclose(report.loc[names, "auroc"], expected.numpy(), atol=1e-6)
    assert report.loc[names, "positives"].tolist() == np.bincount(target).tolist()

    # the same through the files, labels as class names
    preds_path, labels_path = tmp_path / "preds.csv", tmp_path / "labels.csv"
    frame = pd.DataFrame(probs, columns=[f"prob_{name}" for name in names])
    frame.insert(0, "id", [f"case{i}" for i in range(300)])
    frame.to_csv(preds_path, index=False)
    pd.DataFrame({"id": frame["id"], "diagnosis": np.array(names)[target]}).to_csv(labels_path, index=False)
    from_files = run_evaluate(
        preds_path, labels_path, id_column="id", label_format="single", label_column="diagnosis", task="multiclass"
    ).report
    assert np.allclose(from_files["auroc"], report["auroc"], atol=1e-6)


def test_evaluate_predictions_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"Expected argument `probs` to have shape \(N, 3\)"):
        evaluate_predictions(np.full((4, 2), 0.5), np.zeros((4, 2)), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"Expected argument `targets` to have 4 rows"):
        evaluate_predictions(np.full((4, 2), 0.5), np.zeros((3, 2)), ["a", "b"])


def test_predict_csv_is_matched_by_file_name_and_error_rows_left_out(small, tmp_path, caplog):
    """``predict`` writes ``path`` (not ``Image Index``), a ``prediction``/``decision``/``error``/``model`` per row,
    and an empty probability for an unreadable image: evaluate reads that file as it is."""
    header, rows = small.preds[0].split(","), [line.split(",") for line in small.preds[1:51]]
    probs = header[1:]
    lines = ["path," + ",".join(probs) + ",prediction,decision,error,model"]
    lines += [f"/data/images/{r[0]}," + ",".join(r[1:]) + ",none,decided,,m.ckpt" for r in rows]
    lines.append("/data/images/broken.png," + "," * (len(probs) - 1) + ",,error,cannot read,m.ckpt")
    with caplog.at_level("WARNING", logger="medtransfer.commands.evaluate"):
        from_predict = run_evaluate(_write(tmp_path / "predictions.csv", lines), small.labels_path).report
    assert "1 row(s) of images predict could not read" in caplog.text
    by_id = run_evaluate(_write(tmp_path / "by_id.csv", small.preds[:51]), small.labels_path).report
    pd.testing.assert_frame_equal(from_predict, by_id)


def test_a_class_without_positives_is_blank_and_left_out_of_the_mean():
    probs = np.array([[0.9, 0.2], [0.2, 0.3], [0.7, 0.1], [0.4, 0.6]])
    targets = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    report = evaluate_predictions(probs, targets, ["a", "b"], threshold=[0.5, 0.25])
    assert report.loc["b", ["auroc", "aurc", *SELECTIVE]].isna().all() and report.loc["b", "accuracy"] == 0.5
    assert report.loc["mean", "auroc"] == report.loc["a", "auroc"] == 1.0


# ------------------------------------------------------------------------------------ --model with --prevalence
@pytest.fixture(scope="module")
def effusion(chexnet_dir, tmp_path_factory) -> SimpleNamespace:
    """A binary Effusion model whose decision rule and calibration record are fitted (as ``fit`` fits them on
    validation) on the CheXNet reproduction's real predictions of the first half of its test images, and the
    other half to audit. Its weights are untrained: evaluate reads only what the checkpoint stores beside them."""
    ids, names, probs = read_predictions(chexnet_dir / "preds.csv")
    label_ids, targets = read_labels(chexnet_dir / LABELS_GZ, names)
    targets, column, half = join_on_ids(ids, label_ids, targets), names.index("Effusion"), len(ids) // 2
    probs, positive = probs[:, column], targets[:, column]
    rule, record = DecisionFitting("binary").fit(torch.from_numpy(probs[:half]), torch.from_numpy(positive[:half]))
    checkpoint = write_untrained_checkpoint(tmp_path_factory.mktemp("model") / "effusion.ckpt",
                                            ("No Effusion", "Effusion"))  # fmt: skip
    state = torch.load(checkpoint, weights_only=False)
    state["calibration"] = record
    state["state_dict"] |= {"decision_threshold": rule.threshold, "min_confidence": rule.min_confidence}
    torch.save(state, checkpoint)
    return SimpleNamespace(model=checkpoint, ids=ids[half:], probs=probs[half:], positive=positive[half:],
                           source=float(positive[:half].mean()))  # fmt: skip


def _audit(effusion: SimpleNamespace, folder: Path, share: float, n: int = 2000) -> Path:
    """``predict``'s CSV for ``n`` audit images drawn so that a ``share`` of them show an effusion."""
    rng = np.random.default_rng(0)
    sick = rng.choice(np.flatnonzero(effusion.positive == 1), round(share * n), replace=False)
    healthy = rng.choice(np.flatnonzero(effusion.positive == 0), n - len(sick), replace=False)
    rows = rng.permutation(np.concatenate([sick, healthy]))
    path = folder / f"predictions_{share}.csv"
    pd.DataFrame({"path": [f"/data/images/{i}" for i in effusion.ids[rows]], "prob_Effusion": effusion.probs[rows],
                  "error": ""}).to_csv(path, index=False)  # fmt: skip
    return path


@pytest.mark.parametrize("method", ["em", "bbse"])
def test_prevalence_estimate_finds_the_audits_share_and_scores_the_adapted_predictions(
    effusion, chexnet_dir, tmp_path, capsys, method
):
    """Calibrated where 12 % of images show an effusion, audited on images where 35 % do: the estimate finds the
    share, and the adapted probabilities (the same ranking) are better calibrated and more accurate."""
    predictions = _audit(effusion, tmp_path, 0.35)
    result = run_evaluate(predictions, chexnet_dir / LABELS_GZ, tmp_path / "out", task="binary",
                          model=str(effusion.model), prevalence="estimate", prevalence_method=method)  # fmt: skip
    shares = result.prevalence
    assert shares["method"] == method and shares["adapted"] and shares["true"]["Effusion"] == 0.35
    assert shares["estimated"]["Effusion"] == pytest.approx(0.35, abs=0.04)
    low, high = shares["interval"]["Effusion"]
    assert low <= shares["estimated"]["Effusion"] <= high
    assert shares["source"]["Effusion"] == pytest.approx(effusion.source, abs=1e-4)
    plain, adapted = result.report.loc["Effusion"], result.adapted.loc["Effusion"]
    assert adapted["auroc"] == pytest.approx(plain["auroc"]) and adapted["n"] == plain["n"] == 2000
    assert adapted["ece"] < plain["ece"] and adapted["accuracy"] > plain["accuracy"]
    printed = capsys.readouterr().out
    assert f"prevalence ({method}): No Effusion" in printed and "true 0.350" in printed
    table = pd.read_csv(tmp_path / "out" / "evaluation.csv", index_col=["probabilities", "class"])
    rows = [(kind, name) for kind in ("as_predicted", "adapted") for name in ("Effusion", "mean")]
    assert table.index.tolist() == rows
    summary = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert summary["prevalence"] == shares and summary["adapted"][0]["ece"] == pytest.approx(adapted["ece"])


def test_a_given_prevalence_and_a_batch_too_small_to_estimate_from(effusion, chexnet_dir, tmp_path, caplog):
    """A known share adapts to that share; 40 images are too few to estimate from: predict's one-line warning,
    and the true shares with nothing adapted."""
    predictions = _audit(effusion, tmp_path, 0.35)
    given = run_evaluate(predictions, chexnet_dir / LABELS_GZ, task="binary", model=str(effusion.model),
                         prevalence="0.35")  # fmt: skip
    assert given.prevalence["method"] == "given" and given.prevalence["estimated"]["Effusion"] == 0.35
    assert given.adapted.loc["Effusion", "ece"] < given.report.loc["Effusion", "ece"]
    few = _audit(effusion, tmp_path, 0.5, n=40)
    with caplog.at_level("WARNING"):
        result = run_evaluate(few, chexnet_dir / LABELS_GZ, tmp_path / "out", task="binary",
                              model=str(effusion.model), prevalence="estimate")  # fmt: skip
    assert "Prevalence not estimated: a batch of 40 case(s) is too small" in caplog.text
    assert result.adapted is None
    assert result.prevalence == {"method": "em", "adapted": False, "true": {"No Effusion": 0.5, "Effusion": 0.5}}
    summary = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert "adapted" not in summary and summary["prevalence"] == result.prevalence
    assert pd.read_csv(tmp_path / "out" / "evaluation.csv").columns[0] == "class"  # the plain table alone


def test_prevalence_needs_the_model_and_its_task(effusion, chexnet_dir, tmp_path, capsys):
    predictions = _audit(effusion, tmp_path, 0.35, n=60)
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(predictions), str(chexnet_dir / LABELS_GZ), "--task", "binary", "--prevalence",
              "estimate"])  # fmt: skip
    assert exit_info.value.code == 2 and "--prevalence estimate needs --model" in capsys.readouterr().err
    with pytest.raises(DataError, match="is a binary model"):
        run_evaluate(predictions, chexnet_dir / LABELS_GZ, model=str(effusion.model), prevalence="estimate")
    with pytest.raises(DataError, match="--prevalence most: expected none, estimate"):
        run_evaluate(predictions, chexnet_dir / LABELS_GZ, task="binary", model=str(effusion.model),
                     prevalence="most")  # fmt: skip
