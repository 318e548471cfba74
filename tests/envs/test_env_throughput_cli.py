"""`rlft bench env-throughput --json`: one JSON object on stdout, every ratio under a key starting with "ratio"."""

from __future__ import annotations

import json

import torch

from rlft.cli import main


def test_json_output_shape(capsys):
    threads = torch.get_num_threads()
    try:
        code = main(["bench", "env-throughput", "--models", "mlp", "--batch-sizes", "1", "3", "--steps", "2",
                     "--repeats", "2", "--num-steps", "2", "--json"])
    finally:
        torch.set_num_threads(threads)  # the command sets the thread count for its process
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert {k for k in out if k.startswith("ratio")} == {"ratio_mlp_b1", "ratio_mlp_b3"}
    assert [r["batch_size"] for r in out["results"]] == [1, 3] and out["clock"] == "cpu" and out["threads"] == 1
    for row in out["results"]:
        assert row["raw_steps_per_s"] > 0 and row["env_steps_per_s"] > 0 and row["ratio"] > 0
