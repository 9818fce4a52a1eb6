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
    assert ours["speedup_pipelined"] == pytest.approx(
        ours["tgt_tokens_per_s_pipelined"] / plain["tgt_tokens_per_s_pipelined"])
    for r in (ours, plain):
        assert r["device"] == "cpu" and r["tgt_tokens_per_step"] > 0
        assert r["compile_s"] > 0 and r["step_ms"] > 0 and r["step_ms_pipelined"] > 0 and r["compiled_peak_bytes"] > 0
        assert math.isfinite(r["final_loss"]) and r["skipped_steps"] == 0 and r["loss_scale"] == 2.0**15


def test_profile_smoke(tmp_path):
    """benchmarks.profile reads the trace back: per-call wall, busy time, kernel tables."""
    from benchmarks import profile

    out = tmp_path / "profile.json"
    profile.main(["decode", "--smoke", "--top", "3", "--xla-options", "while", "--out", str(out)])
    r = json.loads(out.read_text())
    assert (r["program"], r["impl"], r["xla_options"], r["calls"]) == ("decode", "lsjax", "while", 3)
    assert r["wall_ms"] > 0 and 0 < r["busy_ms"] and r["kernels"] > 0
    assert len(r["top"]) == 3 and all(t["launches"] > 0 and t["ms"] >= 0 for t in r["top"])
    assert sum(c["kernels"] for c in r["categories"].values()) == pytest.approx(r["kernels"])


def test_profile_case_smoke(tmp_path):
    """benchmarks.profile case: one op case's fwd+bwd, ours (cpu_ffi under --smoke) or the XLA reference."""
    from benchmarks import profile

    for impl in ("lsjax", "plain"):
        out = tmp_path / f"case_{impl}.json"
        profile.main(["case", "--smoke", "--case", "embedding:128x64x512:bfloat16", "--impl", impl, "--top", "3",
                      "--timeline", "--apps", "2", "--out", str(out)])
        r = json.loads(out.read_text())
        assert (r["program"], r["case"], r["mode"], r["calls"]) == ("case", "embedding:128x64x512:bfloat16",
                                                                     "fwd+bwd", 3)
        assert r["kernels"] > 0 and r["busy_ms"] > 0
        # The CPU's "kernels" are host thunks, whose idle gaps need not separate the calls (the splitter
        # itself: test_last_call_timeline_splits_calls_at_the_longest_idle_gaps).
        starts = [t["start_us"] for t in r["timeline"]]
        assert starts[0] == 0 and starts == sorted(starts) and 0 < len(starts) <= r["kernels"] * r["calls"]
    with pytest.raises(SystemExit, match="no case"):
        profile.main(["case", "--smoke", "--case", "embedding:1x1x1:bfloat16"])


def test_sass_count_parses_cuobjdump_text():
    from benchmarks.sass_count import parse_sass

    text = """
\t\tFunction : _Z3fooPf
        /*0000*/                   LDC R1, c[0x0][0x28] ;          /* 0x00000a00ff017b82 */
        /*0010*/              @!P0 IMAD.WIDE.U32 R2, R3, 0x4, RZ ; /* 0x000000040302a825 */
        /*0020*/                   EXIT ;                          /* 0x000000000000794d */
\t\tFunction : _Z3barv
        /*0000*/                   BRA 0x0 ;                       /* 0xfffffff000007947 */
"""
    assert parse_sass(text) == {"_Z3fooPf": ["LDC", "IMAD.WIDE.U32", "EXIT"], "_Z3barv": ["BRA"]}


def test_profile_categories_and_busy_time():
    from benchmarks.profile import _union_ns, category

    assert category("void lsjax::LayerNormFwdKernel<float>(...)") == "lsjax"
    assert category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "gemm"
    assert category("nvjet_tst_128x64_64x4_1x2_h_bz_TNT") == "gemm"
    assert category("loop_add_fusion_3") == "xla"
    assert category("Memcpy DtoD") == "copy"
    assert _union_ns([(0, 10), (5, 15), (20, 30)]) == 25  # overlapping streams count once


def test_last_call_timeline_splits_calls_at_the_longest_idle_gaps():
    from benchmarks.profile import last_call_timeline

    # Two calls, 1000 ns apart; inside the second, a 300 ns gap and an overlap on a second stream.
    events = [("a", 0, 100, "s0"), ("b", 150, 50, "s0"),
              ("a", 1200, 100, "s0"), ("side", 1250, 400, "s1"), ("b", 1950, 50, "s0")]
    timeline = last_call_timeline(events, calls=2)
    assert [(t["kernel"], t["stream"], t["start_us"], t["end_us"]) for t in timeline] == [
        ("a", "s0", 0.0, 0.1), ("side", "s1", 0.05, 0.45), ("b", "s0", 0.75, 0.8)]
    assert len(last_call_timeline(events, calls=1)) == 5


def test_decode_smoke(tmp_path):
    from benchmarks import decode

    out = tmp_path / "decode.json"
    decode.main(["--smoke", "--no-topk", "--xla-options", "default,while", "--out", str(out)])
    rows = json.loads(out.read_text())["decode"]
    assert [(r["batch"], r["xla_options"]) for r in rows] == [(1, "default"), (1, "while"), (2, "default"),
                                                                  (2, "while")]
    assert all(r["ours_ms"] > 0 and r["speedup"] == pytest.approx(r["peer_ms"] / r["ours_ms"]) for r in rows)
    assert all(r["same_tokens"] == 1.0 for r in rows), "both searches decode the same toy decoder"
