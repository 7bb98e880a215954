"""`infl score --query-rank K`: the approximation is said on stderr and in the matrix."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from test_cli import invoke, table_config, write_config


def _matrix(path: Path) -> tuple[torch.Tensor, dict]:
    with safe_open(str(path), "pt") as handle:
        return handle.get_tensor("scores"), dict(handle.metadata())


def test_score_query_rank(tmp_path: Path) -> None:
    path = write_config(tmp_path, table_config(tmp_path))
    queries = tmp_path / "queries.csv"
    queries.write_text("index\n0\n1\n2\n")
    exact = invoke("score", str(queries), "-c", str(path), "--matrix", str(tmp_path / "exact.safetensors"))
    assert exact.exit_code == 0, exact.output
    assert "approximate" not in exact.stderr
    low = invoke("score", str(queries), "-c", str(path), "--query-rank", "1", "--matrix", str(tmp_path / "k1.safetensors"))
    assert low.exit_code == 0, low.output
    said = " ".join(low.stderr.split())
    assert "approximate scores: influence.query_rank = 1" in said
    full = invoke("score", str(queries), "-c", str(path), "--set", "influence.query_rank=10000",
                  "--matrix", str(tmp_path / "big.safetensors"))
    assert full.exit_code == 0, full.output
    m_exact, meta_exact = _matrix(tmp_path / "exact.safetensors")
    m_low, meta_low = _matrix(tmp_path / "k1.safetensors")
    m_full, _ = _matrix(tmp_path / "big.safetensors")
    assert "approximation" not in meta_exact and meta_low["approximation"].startswith("query_rank=1")
    assert not torch.allclose(m_low, m_exact, rtol=1e-3)  # rank 1 truncates every hidden layer
    assert torch.allclose(m_full, m_exact, rtol=1e-5, atol=1e-6 * float(m_exact.abs().max()))
    bad = invoke("score", str(queries), "-c", str(path), "--query-rank", "-1")
    assert bad.exit_code == 2


def test_score_shards_remember_query_rank(tmp_path: Path) -> None:
    path = write_config(tmp_path, table_config(tmp_path))
    queries = tmp_path / "queries.csv"
    queries.write_text("index\n0\n1\n")
    assert invoke("fit-factors", "-c", str(path)).exit_code == 0
    for index in (0, 1):
        result = invoke("score", str(queries), "-c", str(path), "--query-rank", "1", "--shard", f"{index}/2")
        assert result.exit_code == 0, result.output
    stale = invoke("merge", "-c", str(path))  # the config says exact: the rank-1 shards do not count
    assert stale.exit_code != 0 and "stale shard" in " ".join(stale.output.split())
    merged = invoke("merge", "-c", str(path), "--set", "influence.query_rank=1")
    assert merged.exit_code == 0, merged.output
