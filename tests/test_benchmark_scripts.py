"""CPU smoke runs of the benchmark scripts: tiny shapes, checks of what they must measure."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import train_step
from lsjax.ops import backend


def test_train_step_smoke(tmp_path, monkeypatch):
    if "lsjax_adam_update_cpu" not in backend.registered_targets()["cpu"]:
        pytest.skip("lsjax._ffi predates the adam_update op: rebuild it (scripts/dev_build.sh)")
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the variant subprocesses need one CPU device, not 8
    out = tmp_path / "train_step.json"
    train_step.main(["--smoke", "--dtypes", "float16", "--out", str(out)])
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"lsjax", "plain"}
    assert not [r["error"] for r in rows.values() if "error" in r]
    ours, plain = rows["lsjax"], rows["plain"]
    # fp16 params + grads + fp32 moments vs fp32 params + grads + moments (a few scalars on top).
    assert ours["bytes_per_param"] == pytest.approx(12, abs=0.01)
    assert plain["bytes_per_param"] == pytest.approx(16, abs=0.01)
    assert (ours["param_dtype"], plain["param_dtype"], ours["lsjax_backend"]) == ("float16", "float32", "cpu_ffi")
    assert ours["params_M"] == plain["params_M"]
    assert ours["speedup"] == pytest.approx(ours["tgt_tokens_per_s"] / plain["tgt_tokens_per_s"])
    for r in (ours, plain):
        assert r["device"] == "cpu" and r["tgt_tokens_per_step"] > 0
        assert r["compile_s"] > 0 and r["step_ms"] > 0 and r["compiled_peak_bytes"] > 0
        assert math.isfinite(r["final_loss"]) and r["skipped_steps"] == 0 and r["loss_scale"] == 2.0**15
