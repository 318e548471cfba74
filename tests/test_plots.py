"""rlft.plots: PNGs are written atomically and readable like any file the user writes."""

import os

import numpy as np

from rlft import plots


def test_png_mode_follows_the_umask_and_no_temporary_file_is_left(tmp_path):
    old = os.umask(0o022)
    try:
        path = plots.scatter_samples(tmp_path / "s.png", np.zeros((10, 2)))
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644  # mkstemp alone gives 0o600
    assert sorted(os.listdir(tmp_path)) == ["s.png"]
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
