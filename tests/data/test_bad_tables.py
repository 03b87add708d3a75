"""Malformed tables are rejected by the real readers with the file, the line and the reason.

One table of cases per reader: CSV manifests (``CsvSource``, the generic image data module's), the official
ChestX-ray14 label file with its split lists (``ChestXray14Source``), and the prediction and label files of
``medtransfer evaluate``. Every case starts from a valid file, written verbatim so that line numbers are known
(the header is line 1), and breaks one thing. Images are real PneumoniaMNIST pixels saved as PNG.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtransfer.commands.evaluate import run_evaluate
from medtransfer.data.images import ChestXray14Source, CsvSource
from medtransfer.errors import DataError


@dataclass
class Case:
    """A valid set of files with one edit, the reader's arguments, and the message the reader must give."""

    edits: dict[str, Callable[[list[str]], list[str]]]
    match: str
    kwargs: dict = field(default_factory=dict)


def _set(line: int, text: str) -> Callable[[list[str]], list[str]]:
    """Replace file line ``line`` (1-based, header = 1)."""
    return lambda lines: [text if number == line else old for number, old in enumerate(lines, start=1)]


def _sub(line: int, old: str, new: str) -> Callable[[list[str]], list[str]]:
    """Replace ``old`` by ``new`` on file line ``line``."""
    return lambda lines: _set(line, lines[line - 1].replace(old, new))(lines)


def _all(old: str, new: str) -> Callable[[list[str]], list[str]]:
    return lambda lines: [line.replace(old, new) for line in lines]


def _write_case(folder: Path, files: dict[str, list[str]], case: Case) -> dict[str, Path]:
    paths = {}
    for name, lines in files.items():
        edited = case.edits.get(name, lambda same: same)(list(lines))
        paths[name] = folder / name
        paths[name].write_text("".join(f"{line}\n" for line in edited))
    return paths


def _check(err: pytest.ExceptionInfo, path: Path, match: str) -> None:
    """The message names the file (by its full path) and matches the expected line and reason."""
    message = str(err.value)
    assert str(path) in message, message
    assert re.search(match, message), f"{match!r} not in {message!r}"


@pytest.fixture(scope="module")
def pngs(pneumonia_npz) -> list[np.ndarray]:
    with np.load(pneumonia_npz) as data:
        return list(data["train_images"][:8])


def _save_images(folder: Path, names: list[str], pngs: list[np.ndarray]) -> None:
    for index, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pngs[index % len(pngs)]).save(folder / name)


# --------------------------------------------------------------------------------------------------- CSV manifests
MANIFEST = [
    "path,label,fold,patient",
    "img/0.png,normal,train,p0",
    "img/1.png,pneumonia,train,p1",
    "img/2.png,normal,val,p2",
    "img/3.png,pneumonia,val,p3",
    "img/4.png,normal,test,p4",
    "img/5.png,pneumonia,test,p5",
]
SPLIT = {"split_column": "fold", "patient_column": "patient"}
CSV_CASES = {
    "missing-column": Case({}, r"line 1 \(the header\) has no column 'diagnosis'", {"label_columns": ["diagnosis"]}),
    "unknown-label": Case(
        {"manifest.csv": _sub(4, "normal", "pneumonai")},
        r"line 4, column 'label': unknown label 'pneumonai' \(did you mean 'pneumonia'\?\)",
        {"class_names": ["normal", "pneumonia"]},
    ),
    "empty-label": Case({"manifest.csv": _sub(3, "pneumonia", "")}, r"line 3, column 'label': the label is empty"),
    "label-index-out-of-range": Case(
        {"manifest.csv": _sub(5, "pneumonia", "2")},
        r"line 5, column 'label': unknown label '2'",
        {"class_names": ["normal", "pneumonia"]},
    ),
    "unknown-split": Case(
        {"manifest.csv": _sub(5, "val", "validation")}, r"line 5, column 'fold': unknown split 'validation'"
    ),
    "duplicated-path": Case(
        {"manifest.csv": _sub(7, "img/5.png", "img/0.png")}, r"lines \[2, 7\], column 'path': .* is listed 2 times"
    ),
    "same-image-spelled-twice": Case(
        {"manifest.csv": _sub(7, "img/5.png", "./img/../img/0.png")}, r"lines \[2, 7\], column 'path'"
    ),
    "patient-in-two-splits": Case(
        {"manifest.csv": _sub(6, "p4", "p0")}, r"patient 'p0' is in splits \['test', 'train'\] \(lines \[2, 6\]"
    ),
    "patient-id-empty": Case({"manifest.csv": _sub(4, "p2", "")}, r"line 4, column 'patient': the patient id is empty"),
    "empty-split": Case({"manifest.csv": _all(",test,", ",val,")}, r"the 'test' split is empty"),
    "empty-split-after-skipping-missing-images": Case(
        {"manifest.csv": lambda lines: _all("img/4.png", "img/gone4.png")(_all("img/5.png", "img/gone5.png")(lines))},
        r"the 'test' split is empty",
        {"missing": "skip", "patient_column": None, "split_column": "fold"},
    ),
    "missing-image": Case(
        {"manifest.csv": _sub(3, "img/1.png", "img/gone.png")},
        r"line 3, column 'path': image .*gone.png does not exist",
    ),
    "empty-path": Case({"manifest.csv": _sub(3, "img/1.png", "")}, r"line 3, column 'path': the path is empty"),
    "semicolon-delimited": Case(
        {"manifest.csv": _all(",", ";")},
        r"single column 'path;label;fold;patient' \(line 1\): it looks separated by ';'",
    ),
    "tab-delimited": Case({"manifest.csv": _all(",", "\t")}, r"\(line 1\): it looks separated by tabs"),
    "one-row-semicolon-delimited": Case(
        {"manifest.csv": _sub(4, ",", ";")}, r"line 4: 'img/2.png;normal;val;p2' looks separated by ';'"
    ),
    "row-with-an-extra-field": Case({"manifest.csv": _sub(5, "p3", "p3,x")}, r"Expected 4 fields in line 5, saw 5"),
    "unterminated-quote": Case({"manifest.csv": _sub(3, "img/1.png", '"img/1.png')}, r"EOF inside string .*line 3"),
    "column-named-twice": Case(
        {"manifest.csv": _set(1, "path,label,fold,label")}, r"line 1: column 'label' appears 2 times in the header"
    ),
    "header-only": Case({"manifest.csv": lambda lines: lines[:1]}, r"has a header but no data rows"),
    "empty-file": Case({"manifest.csv": lambda lines: []}, r"is empty: expected a CSV file with a header row"),
}


@pytest.mark.parametrize("case", CSV_CASES.values(), ids=CSV_CASES.keys())
def test_csv_manifest_rejects(tmp_path, pngs, case):
    _save_images(tmp_path, [f"img/{index}.png" for index in range(6)], pngs)
    paths = _write_case(tmp_path, {"manifest.csv": MANIFEST}, case)
    with pytest.raises(DataError) as err:
        CsvSource(str(paths["manifest.csv"]), **(SPLIT | case.kwargs)).build()
    _check(err, paths["manifest.csv"], case.match)


def test_the_valid_csv_manifest_reads(tmp_path, pngs):
    _save_images(tmp_path, [f"img/{index}.png" for index in range(6)], pngs)
    manifest = CsvSource(str(_write_case(tmp_path, {"manifest.csv": MANIFEST}, Case({}, ""))["manifest.csv"]), **SPLIT)
    assert repr(manifest.build()) == "Manifest(task='binary', classes=2, n=6, train=2, val=2, test=2)"


# --------------------------------------------------------------------------------------------------- ChestX-ray14
NIH = {
    "Data_Entry_2017_v2020.csv": [
        "Image Index,Finding Labels,Follow-up #,Patient ID",
        "00000001_000.png,Cardiomegaly,0,1",
        "00000001_001.png,Cardiomegaly|Emphysema,1,1",
        "00000002_000.png,No Finding,0,2",
        "00000003_000.png,Hernia,0,3",
        "00000004_000.png,Mass|Nodule,0,4",
        "00000005_000.png,No Finding,0,5",
    ],
    "train_val_list.txt": ["00000001_000.png", "00000001_001.png", "00000002_000.png", "00000003_000.png"],
    "test_list.txt": ["00000004_000.png", "00000005_000.png"],
}
LABELS = "Data_Entry_2017_v2020.csv"
NIH_CASES = {
    "missing-column": Case(
        {LABELS: _set(1, "Image Index,Finding Labels,Follow-up #,Patient")},
        r"line 1 \(the header\) has no column 'Patient ID' \(did you mean 'Patient'\?\)",
    ),
    "unknown-finding": Case(
        {LABELS: _sub(5, "Hernia", "Hernai")}, r"line 5, column 'Finding Labels': unknown finding 'Hernai'"
    ),
    "empty-finding": Case({LABELS: _sub(6, "Mass|Nodule", "Mass|")}, r"line 6, column 'Finding Labels': empty finding"),
    "finding-with-no-finding": Case(
        {LABELS: _sub(4, "No Finding", "No Finding|Mass")}, r"line 4, .*lists findings and 'No Finding'"
    ),
    "duplicated-image": Case(
        {LABELS: _sub(7, "00000005_000.png", "00000001_000.png")}, r"lines \[2, 7\], column 'Image Index'"
    ),
    "patient-in-both-lists": Case(
        {
            "train_val_list.txt": lambda lines: [line for line in lines if line != "00000001_001.png"],
            "test_list.txt": lambda lines: [*lines, "00000001_001.png"],
        },
        r"patient '1' is in splits \['test', 'train'\] \(lines \[2, 3\]",
    ),
    "patient-id-empty": Case({LABELS: _sub(4, ",0,2", ",0,")}, r"line 4, column 'Patient ID': the patient id is empty"),
    "empty-test-split-after-filtering": Case(
        {"test_list.txt": _all("0000000", "9999999")}, r"the 'test' split is empty"
    ),
    "missing-image": Case(
        {LABELS: _sub(3, "00000001_001", "00000009_009"), "train_val_list.txt": _all("00000001_001", "00000009_009")},
        r"line 3, column 'Image Index': image .*00000009_009.png does not exist",
    ),
    "semicolon-delimited": Case({LABELS: _all(",", ";")}, r"\(line 1\): it looks separated by ';'"),
}
LIST_CASES = {
    "image-in-both-lists": Case(
        {"test_list.txt": lambda lines: [*lines, "00000002_000.png"]},
        r"test_list.txt line 3: image '00000002_000.png' is also in .*train_val_list.txt \(line 3\)",
    ),
    "image-listed-twice": Case(
        {"train_val_list.txt": lambda lines: [*lines, lines[0]]},
        r"train_val_list.txt line 5: image '00000001_000.png' is listed again \(first on line 1\)",
    ),
    "empty-list": Case({"test_list.txt": lambda lines: ["", ""]}, r"split list .*test_list.txt is empty"),
}


@pytest.mark.parametrize(("name", "case"), [*NIH_CASES.items(), *LIST_CASES.items()], ids=[*NIH_CASES, *LIST_CASES])
def test_chestxray14_label_file_and_lists_reject(tmp_path, pngs, name, case):
    image_names = [line.split(",", 1)[0] for line in NIH[LABELS][1:]]
    _save_images(tmp_path / "images", image_names, pngs)
    paths = _write_case(tmp_path, NIH, case)
    source = ChestXray14Source(
        str(paths[LABELS]), str(tmp_path / "images"), str(paths["train_val_list.txt"]), str(paths["test_list.txt"])
    )
    with pytest.raises(DataError) as err:
        source.build()
    named = next((paths[file] for file in case.edits if file.endswith(".txt")), paths[LABELS])
    _check(err, named if name in LIST_CASES else paths[LABELS], case.match)


# --------------------------------------------------------------------------------------------------- evaluate
EVALUATE = {
    "preds.csv": [
        "Image Index,prob_Mass,prob_Edema",
        "a.png,0.1,0.2",
        "b.png,0.8,0.7",
        "c.png,0.4,0.3",
        "d.png,0.6,0.9",
    ],
    "labels.csv": [
        "Image Index,Finding Labels,Mass,Edema,label",
        "a.png,No Finding,0,0,none",
        "b.png,Mass|Edema,1,1,Mass",
        "c.png,Edema,0,1,Edema",
        "d.png,Edema,0,1,Edema",
    ],
}
EVALUATE_CASES = {
    "labels-missing-column": Case(
        {"labels.csv": _set(1, "Image Index,Findings,Mass,Edema,label")},
        r"line 1 \(the header\) has no column 'Finding Labels'",
    ),
    "labels-unknown-finding": Case(
        {"labels.csv": _sub(4, "Edema,0", "Oedema,0")}, r"line 4, column 'Finding Labels': unknown finding 'Oedema'"
    ),
    "labels-not-0/1": Case(
        {"labels.csv": _sub(3, "Mass|Edema,1,1", "Mass|Edema,yes,1")},
        r"line 3, column 'Mass': expected a label 0 or 1, but got 'yes'",
        {"label_format": "columns"},
    ),
    "labels-unknown-class": Case(
        {"labels.csv": _sub(2, ",none", ",Nodule")},
        r"line 2, column 'label': unknown label 'Nodule'",
        {"label_format": "single", "task": "multiclass"},
    ),
    "labels-duplicated-id": Case(
        {"labels.csv": _sub(5, "d.png", "b.png")}, r"duplicated id\(s\) .*'b.png' on lines \[3, 5\]"
    ),
    "labels-empty-id": Case({"labels.csv": _sub(4, "c.png", "")}, r"line 4, column 'Image Index': the id is empty"),
    "labels-semicolon-delimited": Case({"labels.csv": _all(",", ";")}, r"\(line 1\): it looks separated by ';'"),
    "labels-row-semicolon-delimited": Case(
        {"labels.csv": _sub(3, ",", ";")}, r"line 3: 'b.png;Mass\|Edema;1;1;Mass' looks separated by ';'"
    ),
    "labels-column-named-twice": Case(
        {"labels.csv": _set(1, "Image Index,Finding Labels,Mass,Mass,label")}, r"line 1: column 'Mass' appears 2 times"
    ),
    "preds-duplicated-id": Case({"preds.csv": _sub(3, "b.png", "a.png")}, r"'a.png' on lines \[2, 3\]"),
    "preds-no-probability-column": Case(
        {"preds.csv": _set(1, "Image Index,p_Mass,p_Edema")}, r"has no probability column: expected columns named"
    ),
    "preds-semicolon-delimited": Case({"preds.csv": _all(",", ";")}, r"\(line 1\): it looks separated by ';'"),
    "preds-tab-delimited": Case({"preds.csv": _all(",", "\t")}, r"\(line 1\): it looks separated by tabs"),
    "preds-id-without-label-row": Case(
        {"preds.csv": _sub(4, "c.png", "x.png")}, r"1 of 4 ids in .*preds.csv have no row in .*labels.csv: 'x.png'"
    ),
}


@pytest.mark.parametrize(("name", "case"), EVALUATE_CASES.items(), ids=EVALUATE_CASES.keys())
def test_evaluate_files_reject(tmp_path, name, case):
    paths = _write_case(tmp_path, EVALUATE, case)
    kwargs = dict(case.kwargs)
    if kwargs.get("label_format") == "single":  # class names come from the predictions' columns
        paths["preds.csv"].write_text(
            "Image Index,prob_none,prob_Mass,prob_Edema\na.png,0.8,0.1,0.1\nb.png,0.1,0.8,0.1\n"
            "c.png,0.1,0.1,0.8\nd.png,0.2,0.2,0.6\n"
        )
    with pytest.raises(DataError) as err:
        run_evaluate(paths["preds.csv"], paths["labels.csv"], **kwargs)
    _check(err, paths[name.split("-", 1)[0] + ".csv"], case.match)


def test_the_valid_evaluate_files_read(tmp_path):
    paths = _write_case(tmp_path, EVALUATE, Case({}, ""))
    report = run_evaluate(paths["preds.csv"], paths["labels.csv"]).report
    assert list(report.index) == ["Mass", "Edema", "mean"]
