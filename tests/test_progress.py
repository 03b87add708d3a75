"""Long steps report done/total, images/s and the time left: a line every ``interval`` seconds in a log."""

from __future__ import annotations

from medtransfer.progress import Progress


def test_log_lines_give_count_rate_and_time_left(capsys):
    with Progress(10, "features train", interval=0.0) as progress:
        for _ in range(5):
            progress.update(2)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("features train: 2/10 images, ") and "images/s" in lines[0] and "s left" in lines[0]
    assert lines[-1].startswith("features train: 10/10 images, ") and "left" not in lines[-1]
    assert len(lines) == 5  # four while running, one at the end
