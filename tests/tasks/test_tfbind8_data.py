"""TFBind8 data: design-bench's preprocessing reproduced, the shipped table, encoding round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rlft.tasks.tfbind8_data import (
    NUM_SEQUENCES, decode_index, encode_index, load_table, read_scores_file, shipped_table,
    strings_from_tokens, tokens_from_strings,
)

RAW = Path(__file__).resolve().parents[3] / "shared" / "data" / "tfbind8" / "SIX6_REF_R1_8mers.txt"


def _write_fixture(path: Path, rng: np.random.Generator) -> np.ndarray:
    """A complete raw file of the same format with random E-scores; returns E per k-mer index."""
    comp = str.maketrans("ACGT", "TGCA")
    seen, rows, e_by_index = set(), [], np.zeros(NUM_SEQUENCES)
    for idx in range(NUM_SEQUENCES):
        kmer = strings_from_tokens(decode_index(np.array([idx])))[0]
        rev = kmer.translate(comp)[::-1]
        if rev in seen:
            continue
        seen.add(kmer)
        e = float(rng.normal())
        rows.append(f"{kmer}\t{rev}\t{e:.5f}\t1.0\t0.0\n")
        e_by_index[idx] = e_by_index[encode_index(tokens_from_strings([rev]))[0]] = round(e, 5)
    path.write_text("8-mer\t8-mer\tE-score\tMedian\tZ-score\n" + "".join(rows))
    return e_by_index


def test_encoding_round_trips():
    idx = np.arange(NUM_SEQUENCES)
    assert np.array_equal(encode_index(decode_index(idx)), idx)
    assert strings_from_tokens(tokens_from_strings(["ACGTTGCA", "AAAAAAAA"])) == ["ACGTTGCA", "AAAAAAAA"]
    with pytest.raises(ValueError, match="letters ACGT"):
        tokens_from_strings(["ACGTNNNN"])


def test_any_file_of_the_format_is_preprocessed_like_design_bench(tmp_path):
    e = _write_fixture(tmp_path / "tf.txt", np.random.default_rng(0))
    data = read_scores_file(tmp_path / "tf.txt")
    assert len(data.y) == 2 * 32_896  # both strands; palindromes twice
    expected = (e - e.min()) / (e.max() - e.min())
    assert np.allclose(data.table(), expected, atol=1e-6)
    assert np.allclose(load_table(tmp_path / "tf.txt"), expected, atol=1e-6)


def test_shipped_table_is_complete_and_normalised():
    table = shipped_table()
    assert table.shape == (NUM_SEQUENCES,) and table.dtype == np.float32
    assert table.min() == 0.0 and table.max() == 1.0 and np.isfinite(table).all()


@pytest.mark.skipif(not RAW.is_file(), reason="the raw SIX6 file is only beside the project checkout")
def test_raw_file_reproduces_design_bench_numbers_and_the_shipped_table():
    data = read_scores_file(RAW)
    assert len(data.y) == 65_792
    visible = data.visible_split()
    assert len(visible.y) == 32_898
    assert abs(float(visible.y.max()) - 0.4393) < 1e-4
    assert np.array_equal(data.table(), shipped_table())


def test_bad_files_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_scores_file(tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_text("a\tb\n")
    with pytest.raises(ValueError, match="expected a header"):
        read_scores_file(tmp_path / "bad.txt")
