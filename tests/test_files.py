"""rlft.files.atomic_path: the one place rlft's atomic writes get their mode and their clean-up."""

import os

import pytest

from rlft.files import atomic_path


def test_written_file_gets_the_umask_mode_and_replaces_the_old_one(tmp_path):
    target = tmp_path / "sub" / "results.json"
    old = os.umask(0o027)
    try:
        with atomic_path(target) as tmp:
            tmp.write_text("new")
    finally:
        os.umask(old)
    assert target.read_text() == "new"
    assert os.stat(target).st_mode & 0o777 == 0o640  # mkstemp alone gives 0o600
    assert os.listdir(target.parent) == ["results.json"]


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.json"]
