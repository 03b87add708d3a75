"""Mutation fuzzing through the reader and ``predict``: real PNG/JPEG/BMP/TIFF/DICOM files (from PneumoniaMNIST
X-rays), damaged by seeded mutations (``mutate.py``). Whatever the bytes, the reader returns a ``(H, W) uint8``
image or raises one ``DataError`` naming the file, and ``predict`` writes one row per file, every bad one with
its reason. ``make test`` runs a few hundred cases; the ``faults`` marker (``make test-faults``) runs thousands.
"""

from __future__ import annotations

import csv
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from mutate import mutants, seeds
from untrained import write_untrained_checkpoint

from medtransfer.commands.predict import run_predict
from medtransfer.data.readers import read_image
from medtransfer.errors import DataError


@pytest.fixture(scope="module")
def seed_files(pneumonia_npz) -> list[tuple[str, str, bytes]]:
    with np.load(pneumonia_npz) as data:
        return seeds(data["test_images"][:12])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_untrained_checkpoint(tmp_path_factory.mktemp("model") / "model.ckpt")


def _write(folder: Path, seed_files, n: int, seed: int) -> dict[Path, str]:
    folder.mkdir(parents=True)
    written = {}
    for i, mutant in enumerate(mutants(seed_files, n, seed)):
        path = folder / f"{i:05d}_{mutant.kind}{mutant.suffix}"
        path.write_bytes(mutant.data)
        written[path] = f"{mutant.kind}: {mutant.mutation}"
    return written


def _fuzz_reader(folder: Path, seed_files, n: int, seed: int) -> Counter:
    outcomes: Counter = Counter()
    escaped = []
    for path, what in _write(folder, seed_files, n, seed).items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow warns about odd-but-readable files; outcomes are checked
                gray = read_image(path)
        except DataError as err:
            assert str(err).startswith(f"{path}: ") and "\n" not in str(err), (what, str(err))
            outcomes["reported"] += 1
            continue
        except Exception as err:  # what the test counts
            escaped.append(f"{path.name} ({what}): {type(err).__name__}: {err}")
            continue
        assert gray.dtype == np.uint8 and gray.ndim == 2 and gray.size > 0, what
        outcomes["read"] += 1
    assert escaped == [], f"{len(escaped)} of {n} mutants escaped the reader:\n" + "\n".join(escaped[:20])
    return outcomes


def _fuzz_predict(folder: Path, seed_files, checkpoint: Path, output: Path, n: int, seed: int, workers: int):
    written = _write(folder, seed_files, n, seed)
    result = run_predict(str(folder), str(checkpoint), output=output, batch_size=32, num_workers=workers)
    with output.open(newline="", encoding="utf-8") as handle:
        rows = {Path(row["path"]): row for row in csv.DictReader(handle)}
    assert set(rows) == set(written)  # the CSV is complete: one row per file, none lost, none added
    for path, row in rows.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                read_image(path)
            readable = True
        except DataError:
            readable = False
        if readable:
            assert row["decision"] in {"positive", "negative", "abstain"} and row["error"] == "", written[path]
        else:
            assert row["decision"] == "error" and row["error"].startswith(f"{path}: "), (written[path], row)
    assert result.unreadable + result.predicted == n
    return result


def test_a_few_hundred_mutants_never_escape_the_reader(tmp_path, seed_files):
    """Seed 3's 400 mutants hold two that Pillow's undocumented ``TypeError`` used to let escape."""
    outcomes = _fuzz_reader(tmp_path / "mutants", seed_files, 400, seed=3)
    assert outcomes["read"] > 0 and outcomes["reported"] > 0  # both outcomes are exercised


def test_predict_over_mutants_writes_every_row_with_its_reason(tmp_path, seed_files, checkpoint):
    result = _fuzz_predict(tmp_path / "mutants", seed_files, checkpoint, tmp_path / "p.csv", 400, seed=3, workers=0)
    assert result.predicted > 0 and result.unreadable > 0


@pytest.mark.faults
@pytest.mark.parametrize("seed", [10, 11])
def test_thousands_of_mutants_never_escape_the_reader(tmp_path, seed_files, seed):
    _fuzz_reader(tmp_path / "mutants", seed_files, 3000, seed=seed)


@pytest.mark.faults
def test_predict_over_thousands_of_mutants_with_workers(tmp_path, seed_files, checkpoint):
    _fuzz_predict(tmp_path / "mutants", seed_files, checkpoint, tmp_path / "p.csv", 2000, seed=20, workers=2)
