"""TFBind8 data: binding scores of all 4^8 DNA 8-mers, with design-bench's preprocessing.

Raw format (PBM 8-mer files, e.g. SIX6_REF_R1_8mers.txt; design-bench ships 200 transcription factors in
it): a header line, then tab-separated rows `8-mer`, `8-mer` (reverse complement), `E-score`, `Median`,
`Z-score`. Each row scores a k-mer and its reverse complement.

design-bench's preprocessing (TFBind8-Exact-v0): letters a,c,g,t -> 0..3; both strands of every row become
a sample with the same y = (E - min E) / (max E - min E), so 32,896 rows give 65,792 samples (the 256
palindromes appear twice); the task's visible split keeps y at or below the 50th percentile.

The package ships the SIX6 (reference allele, replicate 1) table as 65,536 float32 scores indexed by the
base-4 code of the 8-mer (`rlft/data/tfbind8_six6.npy`; attribution and licence in `rlft/data/README.md`).

A state of the diffusion is the one-hot 8-mer, (8, 4) (`one_hot`, `decode`, `sequence_index`); the model is
trained on design-bench's 65,792 rows (`pretraining_data`).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

ALPHABET = "ACGT"
ALPHABET_SIZE = 4
SEQ_LEN = 8
#: One state x: a one-hot 8-mer (or a continuous state of the same shape).
EVENT_SHAPE = (SEQ_LEN, ALPHABET_SIZE)
NUM_SEQUENCES = 4**SEQ_LEN
_COMPLEMENT = str.maketrans("ACGT", "TGCA")
_POWERS = 4 ** np.arange(SEQ_LEN - 1, -1, -1)  # (L,) first letter most significant
_POWERS_T = torch.as_tensor(_POWERS, dtype=torch.long)  # (L,)


@dataclass(frozen=True)
class TFBindData:
    """design-bench's samples: tokens (N, 8) int64 in 0..3 and normalised scores y (N,) float32."""

    tokens: np.ndarray
    y: np.ndarray

    def visible_split(self) -> "TFBindData":
        """The samples with y at or below the 50th percentile (design-bench's training split)."""
        keep = self.y <= np.percentile(self.y, 50)
        return TFBindData(self.tokens[keep], self.y[keep])

    def table(self) -> np.ndarray:
        """Score of every 8-mer indexed by its base-4 code, shape (65536,) float32."""
        out = np.full(NUM_SEQUENCES, np.nan, dtype=np.float32)
        out[encode_index(self.tokens)] = self.y
        if np.isnan(out).any():
            raise ValueError(f"the scores file misses {int(np.isnan(out).sum())} of the {NUM_SEQUENCES} 8-mers")
        return out


def encode_index(tokens: np.ndarray) -> np.ndarray:
    """Base-4 code of token sequences (..., 8) -> (...) int64."""
    return (np.asarray(tokens, dtype=np.int64) * _POWERS).sum(-1)


def decode_index(index: np.ndarray) -> np.ndarray:
    """Inverse of `encode_index`: (...) -> (..., 8) int64."""
    index = np.asarray(index, dtype=np.int64)
    return (index[..., None] // _POWERS) % 4


def tokens_from_strings(seqs: list[str]) -> np.ndarray:
    """["ACGT...", ...] -> (N, 8) int64."""
    lut = {c: i for i, c in enumerate(ALPHABET)}
    try:
        return np.array([[lut[c] for c in s.upper()] for s in seqs], dtype=np.int64)
    except KeyError as err:
        raise ValueError(f"sequences must use the letters {ALPHABET} (found {err.args[0]!r})") from None


def strings_from_tokens(tokens: np.ndarray) -> list[str]:
    return ["".join(ALPHABET[i] for i in row) for row in np.asarray(tokens)]


def read_scores_file(path: str | Path) -> TFBindData:
    """Reads a raw PBM 8-mer file and applies design-bench's preprocessing (both strands, min-max y)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scores file {str(path)!r} does not exist (expected a PBM 8-mer table such as SIX6_REF_R1_8mers.txt)")
    kmers, revs, scores = [], [], []
    with path.open() as fh:
        header = fh.readline().rstrip("\n").split("\t")
        if len(header) < 3 or "E-score" not in header[2]:
            raise ValueError(f"{path}: expected a header '8-mer<TAB>8-mer<TAB>E-score...' (got {header[:3]})")
        for line_no, line in enumerate(fh, start=2):
            parts = line.split("\t")
            if len(parts) < 3:
                raise ValueError(f"{path}:{line_no}: expected at least 3 tab-separated columns")
            kmers.append(parts[0])
            revs.append(parts[1])
            scores.append(float(parts[2]))
    e = np.asarray(scores, dtype=np.float64)
    for name, seqs in (("8-mer", kmers), ("reverse complement", revs)):
        if any(len(s) != SEQ_LEN for s in seqs):
            raise ValueError(f"{path}: every {name} must have {SEQ_LEN} letters")
    if any(r != k.translate(_COMPLEMENT)[::-1] for k, r in zip(kmers, revs)):
        raise ValueError(f"{path}: the second column must be the reverse complement of the first")
    y = ((e - e.min()) / (e.max() - e.min())).astype(np.float32)
    tokens = np.concatenate([tokens_from_strings(kmers), tokens_from_strings(revs)])
    return TFBindData(tokens, np.concatenate([y, y]))


def shipped_table() -> np.ndarray:
    """The packaged SIX6 score table, (65536,) float32 indexed by `encode_index`."""
    with resources.files("rlft.data").joinpath("tfbind8_six6.npy").open("rb") as fh:
        return np.load(fh)


def load_table(scores_file: str | Path | None = None) -> np.ndarray:
    """Exact r* for every 8-mer: the shipped SIX6 table, or any raw file of the same format."""
    return shipped_table() if scores_file is None else read_scores_file(scores_file).table()


# -- one-hot states (the diffusion's event space) ---------------------------------------------------------------------------------------


def one_hot(tokens: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Token ids (..., 8) -> one-hot float32 (..., 8, 4)."""
    t = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens, dtype=torch.long)
    return torch.nn.functional.one_hot(t, ALPHABET_SIZE).to(torch.float32)


def decode(x: torch.Tensor) -> torch.Tensor:
    """Argmax decoding of states (B, 8, 4) -> token ids (B, 8) int64."""
    if x.ndim != 3 or tuple(x.shape[1:]) != EVENT_SHAPE:
        raise ValueError(f"TFBind8 states must have shape (B, 8, 4) (got {tuple(x.shape)})")
    return x.argmax(-1)


def sequence_index(x: torch.Tensor) -> torch.Tensor:
    """Base-4 code of the argmax-decoded sequence (B,) int64 (the index of `load_table`)."""
    return (decode(x) * _POWERS_T.to(x.device)).sum(-1)


def all_sequences() -> torch.Tensor:
    """Every 8-mer as one-hot, (65536, 8, 4), in index order."""
    return one_hot(decode_index(np.arange(NUM_SEQUENCES)))


def data_distribution() -> np.ndarray:
    """Design-bench's data law over the 65,536 sequences, float64 (65536,): palindromes count twice (65,792 rows)."""
    tokens = decode_index(np.arange(NUM_SEQUENCES))
    revcomp = encode_index((3 - tokens)[:, ::-1])  # A<->T, C<->G reversed
    weights = np.where(revcomp == np.arange(NUM_SEQUENCES), 2.0, 1.0)
    return weights / weights.sum()


def pretraining_data() -> np.ndarray:
    """The 65,792 one-hot rows the diffusion model is trained on, float32 (65792, 8, 4)."""
    p = data_distribution()
    idx = np.repeat(np.arange(NUM_SEQUENCES), np.round(p / p.min()).astype(int))
    return one_hot(decode_index(idx)).numpy()
