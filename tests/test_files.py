"""atomic_open: a file appears whole or not at all."""

from __future__ import annotations

import pytest

from medtransfer.files import atomic_open, write_text_atomic


def test_written_file_replaces_the_old_one_whole(tmp_path):
    target = tmp_path / "out" / "report.csv"
    write_text_atomic(target, "old\n")
    with atomic_open(target, "w") as handle:
        handle.write("new\n")
        assert target.read_text() == "old\n"  # not visible until the block ends
    assert target.read_text() == "new\n" and sorted(p.name for p in target.parent.iterdir()) == ["report.csv"]


def test_an_error_inside_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "report.csv"
    write_text_atomic(target, "kept\n")
    with pytest.raises(KeyboardInterrupt), atomic_open(target, "w") as handle:
        handle.write("half")
        raise KeyboardInterrupt
    assert target.read_text() == "kept\n" and [p.name for p in tmp_path.iterdir()] == ["report.csv"]
