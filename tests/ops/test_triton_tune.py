"""The autotuner's choice (lsp/ops/linear/triton_tune.py): spilling configs pruned, the fastest of the rest cached per
shape key. Compile and timing are stand-ins here (no GPU): the fastest candidate spills and must not be chosen."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from lsp.ops import linear_attention  # noqa: E402
from lsp.ops.linear import triton_tune  # noqa: E402
from lsp.ops.linear.triton_chunk import CHUNK_WARPS  # noqa: E402
from lsp.ops.linear.triton_tune import CANDIDATES, Tuner  # noqa: E402

from .linear_cases import make_inputs  # noqa: E402

CANDS = {"k": [dict(BV=64, num_warps=8), dict(BV=32, num_warps=8), dict(BV=32, num_warps=4)]}
SPILLS = {(64, 8): 0, (32, 8): 120, (32, 4): 0}    # the fastest config spills
TIMES = {(64, 8): 2.0, (32, 8): 0.5, (32, 4): 1.0}


def _fakes(calls):
    def spills(cfg):
        calls.append("compile")
        return SPILLS[cfg["BV"], cfg["num_warps"]]

    def timing(cfg):
        calls.append("time")
        return TIMES[cfg["BV"], cfg["num_warps"]]

    return spills, timing


def test_pick_prunes_spills_takes_fastest_and_caches_per_key():
    tuner, calls = Tuner(CANDS), []
    assert tuner.pick("k", ("a",), *_fakes(calls)) == dict(BV=32, num_warps=4)   # not the spilling (32, 8)
    n = len(calls)
    assert tuner.pick("k", ("a",), *_fakes(calls)) == dict(BV=32, num_warps=4) and len(calls) == n  # cached
    tuner.pick("k", ("b",), *_fakes(calls))
    assert len(calls) > n                                                          # a new key is tuned again


def test_pick_defaults():
    tuner = Tuner(CANDS)
    assert tuner.pick("k", (1,), None, None) == CANDS["k"][0]                       # no compiler: the first
    assert Tuner(CANDS).pick("k", (1,), lambda c: 8, lambda c: 1.0) == CANDS["k"][0]  # all spill: the first

    def broken(cfg):
        raise RuntimeError("no driver")

    with pytest.warns(UserWarning, match="autotuning k failed"):
        assert Tuner(CANDS).pick("k", (1,), broken, broken) == CANDS["k"][0]


def test_defaults_are_the_compile_checked_configs_and_the_op_uses_the_tuner(monkeypatch):
    """The first candidate of every tuned kernel is what runs without a GPU (and what test_triton_sm90 checks)."""
    for name, options in CANDIDATES.items():
        assert options[0]["num_warps"] == CHUNK_WARPS and options[0]["num_stages"] == 3, name
    if torch.cuda.is_available():
        pytest.skip("on CUDA the op tunes for real")
    monkeypatch.setattr(triton_tune, "TUNER", Tuner(CANDIDATES))
    q, k, v, g, s0 = make_inputs("key", B=1, T=20, H=1, K=8, V=8, dtype=torch.float32)
    o, s = linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, backend="triton")
    (o.sum() + s.sum()).backward()
    chosen = {name: cfg for (name, _), cfg in triton_tune.TUNER.cache.items()}
    assert chosen == {name: options[0] for name, options in CANDIDATES.items()}
