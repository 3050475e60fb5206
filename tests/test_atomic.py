"""A killed or failed write never leaves a half file where a reader looks."""

from pathlib import Path

import pytest

from clcalib.atomic import atomic_path


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path: Path):
    target = tmp_path / "sub" / "report.json"
    with atomic_path(target) as tmp:
        tmp.write_text("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]
