"""The real train step under every mesh config, on conftest's 8 fake CPU devices.

The model is lsjax.models.Transformer (transformer-tiny cut to one encoder and one decoder
layer, 8 heads so tensor=8 divides them), fp32, dropout on (the fused ops reproduce the
unsharded masks under any sharding), fused ops on the ``cpu_ffi`` backend.
"""

import dataclasses
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lsjax import ops, optim
from lsjax.parallel import OVERLAP_COLLECTIVES
from lsjax.training import loop
from lsjax.training.checkpoint import Checkpointer
from lsjax.training.config import OptimizerConfig, TrainConfig

CPUS = jax.devices("cpu")
N = len(CPUS)
VOCAB, ROWS, LENGTH = 80, 16, 6  # distinct from every param dim, so HLO shapes identify tensors
MODES = ["dp", "zero1", "zero2", "zero3", "tp", "dp_tp"]
OVERRIDES = {"num_encoder_layers": 1, "num_decoder_layers": 1, "nhead": 8}
ROOT = Path(__file__).resolve().parents[1]


def _setup(precision: str = "fp32", **overrides):
    # The multi-tensor Adam kernel (not XLA's update), so the HLO shows which elements each device updates.
    config = TrainConfig(model="transformer-tiny", precision=precision, model_overrides={**OVERRIDES, **overrides},
                         optimizer=OptimizerConfig(kernel="multi"))
    optimizer, _ = loop.build_optimizer(config)
    return loop.build_model(config, VOCAB), optimizer


MODEL, OPTIMIZER = _setup()


def _batch(rng) -> dict:
    batch = {k: rng.integers(3, VOCAB, (ROWS, LENGTH)).astype(np.int32) for k in ("src", "tgt_in", "tgt_out")}
    batch["src"][: ROWS // 2, LENGTH - 2 :] = 0  # some padding
    batch["tgt_out"][::3, LENGTH - 1] = 0
    return batch


BATCH = _batch(np.random.default_rng())
SEED = int(np.random.default_rng().integers(1 << 20))


def _per_device_bytes(tree) -> int:
    dev = CPUS[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)


def _total_bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def _arrays(tree) -> list:
    return [x for x in jax.tree.leaves(tree) if x.ndim]


def _collectives(hlo: str, op: str) -> list[tuple[int, ...]]:
    """Result shapes of the ``op`` instructions (tuple results: each element)."""
    shapes = []
    for result in re.findall(rf"= (\(.*?\)|\S+) {op}\(", hlo):
        shapes += [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\w+\[([\d,]*)\]", result)]
    return shapes


def _activation_gathers(hlo: str) -> list[tuple[int, ...]]:
    """All-gathers of activations: results led by the global rows (batch or tokens)."""
    return [s for s in _collectives(hlo, "all-gather") if s and s[0] in (ROWS, ROWS * LENGTH)]


def _adam_elements(hlo: str) -> int:
    """Param elements the multi-tensor Adam calls update on one device (each call's results: its
    params, then as many first and second moments)."""
    total = 0
    for results in re.findall(r"= \(([^)]*)\) custom-call\([^\n]*custom_call_target=\"lsjax_adam_update_multi_cpu\"", hlo):
        shapes = re.findall(r"\w+\[([\d,]*)\]", results)
        total += sum(math.prod(int(d) for d in dims.split(",") if d) for dims in shapes[:len(shapes) // 3])
    return total


_RUNS: dict[str, tuple] = {}


def _run(mode: str):
    """``(plan, state before, state after, metrics, compiled HLO, memory analysis)``, once per mode."""
    if mode not in _RUNS:
        with ops.use_backend("cpu_ffi"):
            plan = loop.make_plan(mode, MODEL, BATCH, CPUS)
            state = loop.init_sharded_state(MODEL, OPTIMIZER, BATCH, SEED, plan)
            abstract = loop.abstract_state(MODEL, OPTIMIZER, BATCH, SEED, plan)
            step, _ = loop.compile_steps(MODEL, OPTIMIZER, plan, abstract, label_smoothing=0.1)
            batch = loop.shard_batch(plan, BATCH)
            compiled = step.lower(state, batch).compile()
            before = jax.device_get(state)
            new_state, metrics = compiled(state, batch)
        _RUNS[mode] = (plan, before, new_state, metrics, compiled.as_text(), compiled.memory_analysis())
    return _RUNS[mode]


@pytest.mark.parametrize("mode", MODES)
def test_step_matches_single_device(mode):
    _, want_before, want, want_metrics, _, _ = _run("single")
    plan, before, got, metrics, hlo, memory = _run(mode)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(want_before)):  # same init on every mesh
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=1e-6)
    assert int(metrics["tokens"]) == int(want_metrics["tokens"]) == np.count_nonzero(BATCH["tgt_out"])
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=jax.tree_util.keystr(path))
    for leaf, sharding in zip(jax.tree.leaves(got.params), jax.tree.leaves(plan.params)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)

    # Per-device bytes of params and optimizer state (what device 0 holds after the step).
    params, state = got.params, _arrays(got.opt_state)
    param_bytes, state_bytes = _per_device_bytes(params), _per_device_bytes(state)
    full_params, full_state = _total_bytes(params), _total_bytes(state)
    expect = {
        "dp": (full_params, full_state),
        "zero1": (full_params, full_state // N),
        "zero2": (full_params, full_state // N),
        "zero3": (full_params // N, full_state // N),
    }
    if mode in expect:
        assert (param_bytes, state_bytes) == expect[mode]
    else:  # tensor parallel: every param but the [hidden] vectors (norms, output biases) split over `tensor`
        tensor = plan.mesh.shape["tensor"]
        for leaf in jax.tree.leaves(params):
            split = "tensor" in str(leaf.sharding.spec)
            assert split != (leaf.shape == (64,)), leaf.shape
            assert _per_device_bytes(leaf) == leaf.nbytes // (tensor if split else 1)
    assert memory.argument_size_in_bytes >= param_bytes + state_bytes
    if mode == "zero3":
        assert memory.argument_size_in_bytes < (full_params + full_state) / (N / 2)

    # The collectives XLA chose (CPU lowers a reduce-scatter to all-reduce + dynamic-slice).
    grads_reduced = [s for s in _collectives(hlo, "all-reduce") if s == (VOCAB, 64)]  # embedding grad
    gathers = _collectives(hlo, "all-gather")
    n_params = sum(x.size for x in jax.tree.leaves(params))
    if mode == "dp":
        assert grads_reduced and not gathers
        assert _adam_elements(hlo) == n_params  # every device updates everything
    if mode in ("zero1", "zero2", "zero3"):
        assert _adam_elements(hlo) == n_params // N  # each device updates its slice of the state
        assert (VOCAB, 64) in gathers  # the updated (ZeRO-1/2) or used (ZeRO-3) params are gathered
    if mode in ("tp", "dp_tp"):
        assert "lsjax_cross_entropy" not in hlo  # the vocab-parallel path: no gathered kernel call
        assert not [s for s in gathers if s and s[-1] == VOCAB], "vocab-split logits must never be gathered"
        assert (VOCAB, 64) not in gathers, "the vocab-split embedding table must never be gathered"
        assert not grads_reduced, "the embedding gradient stays vocab-split (only its blocks are summed)"
        assert _collectives(hlo, "all-reduce"), "row-parallel outputs are all-reduced"
    if mode not in ("tp", "dp_tp"):
        assert not _activation_gathers(hlo)


def test_tp_keeps_ffn_activations_split():
    """The mlp-split FFN activations [tokens, mlp] stay split through bias_act_dropout (fwd and bwd)."""
    assert not _activation_gathers(_run("tp")[4])


def test_zero2_pins_gradients_to_data_shards():
    """ZeRO-2 constrains the gradients right after the backward (a reduce-scatter on GPU)."""
    plan = _run("zero2")[0]
    for got, grad, update in zip(jax.tree.leaves(plan.params), jax.tree.leaves(plan.grads),
                                 jax.tree.leaves(plan.update)):
        assert grad == update and "data" in str(grad.spec) and "data" not in str(got.spec)


def test_multi_device_steps_overlap_collectives(tmp_path):
    """Plans over several devices compile with the latency-hiding scheduler; one device, or
    ``overlap_collectives: false``, keeps XLA's defaults."""
    assert loop.make_plan("dp", MODEL, BATCH, CPUS[:2]).compiler_options == OVERLAP_COLLECTIVES
    assert loop.make_plan("single", MODEL, BATCH).compiler_options is None
    off = tmp_path / "dp_no_overlap.yaml"
    off.write_text((ROOT / "configs/mesh/dp.yaml").read_text() + "overlap_collectives: false\n")
    assert loop.make_plan(str(off), MODEL, BATCH, CPUS[:2]).compiler_options is None


def _compiled_gpu_step(mode: str, overlap: bool = True) -> str:
    devices = jax.devices("gpu")
    if len(devices) < 2:
        pytest.skip("needs 2 GPUs")
    plan = loop.make_plan(mode, MODEL, BATCH, devices[:2])
    plan = dataclasses.replace(plan, config=dataclasses.replace(plan.config, overlap_collectives=overlap))
    abstract = loop.abstract_state(MODEL, OPTIMIZER, BATCH, SEED, plan)
    step, _ = loop.compile_steps(MODEL, OPTIMIZER, plan, abstract, label_smoothing=0.1)
    return step.lower(abstract, loop.shard_batch(plan, BATCH)).compile().as_text()


def _kernels_under_collectives(hlo: str, collective: str) -> int:
    """Fusions and custom calls scheduled between an async ``collective``'s start and its done."""
    inside, count = set(), 0
    for line in hlo.splitlines():
        name = re.match(r"\s*(?:ROOT )?%?([\w.-]+) = ", line)
        if name and f" {collective}-start(" in line:
            inside.add(name.group(1))
        elif f" {collective}-done(" in line:
            inside -= set(re.findall(r"%([\w.-]+)", line.split(f"{collective}-done(", 1)[1]))
        elif inside and re.search(r" (fusion|custom-call)\(", line):
            count += 1
    return count


@pytest.mark.gpu
@pytest.mark.parametrize("mode, collective", [("zero2", "reduce-scatter"), ("zero3", "all-gather"),
                                              ("dp", "all-reduce")])
def test_collectives_on_two_gpus(mode, collective):
    assert re.search(rf"{collective}(-start)?\(", _compiled_gpu_step(mode))


@pytest.mark.gpu
def test_gradient_all_reduces_overlap_the_backward_on_two_gpus():
    """With overlap_collectives (default), kernels run between the all-reduces' starts and dones."""
    overlapped, serial = (_kernels_under_collectives(_compiled_gpu_step("dp", o), "all-reduce") for o in (True, False))
    assert overlapped > serial, (overlapped, serial)


@pytest.mark.parametrize("precision, mode", [("fp16", "zero3"), ("bf16", "dp")])
def test_overflow_on_one_shard_skips_the_step_everywhere(precision, mode):
    """An inf in one device's gradient shard: every device skips the update, the fp16 scale halves."""
    model, optimizer = _setup(precision)
    with ops.use_backend("cpu_ffi"):
        plan = loop.make_plan(mode, model, BATCH, CPUS)
        state = loop.init_sharded_state(model, optimizer, BATCH, SEED, plan)
        shardings = loop.state_shardings(plan, state)

        def update(state, grads):
            grads, params = plan.for_update(plan.constrain_grads(grads)), plan.for_update(state.params)
            updates, opt_state = optimizer.update(grads, state.opt_state, params)
            return state.replace(params=optim.apply_updates(params, updates), opt_state=opt_state)

        step = plan.jit(update, (shardings, plan.grads), shardings)
        grads = jax.tree.map(lambda p: np.full(p.shape, 0.5, p.dtype), jax.device_get(state.params))
        table = grads["embed"]["embedding"]
        table[-1, -1] = np.inf  # lives on the last device only (zero3: the table is split over data)
        scale = float(state.opt_state.loss_scale.loss_scale)
        before = jax.device_get(state)
        after = step(state, jax.device_put(grads, plan.grads))
    if mode == "zero3":
        owners = [s.device for s in state.params["embed"]["embedding"].addressable_shards
                  if s.index[1].stop == table.shape[1]]
        assert owners == [CPUS[-1]]
    assert int(after.opt_state.skipped_steps) == 1
    assert float(after.opt_state.loss_scale.loss_scale) == (scale / 2 if precision == "fp16" else 1.0)
    for a, b in zip(jax.tree.leaves((after.params, after.opt_state.inner_state)),
                    jax.tree.leaves((before.params, before.opt_state.inner_state))):
        for shard in a.addressable_shards:  # unchanged on every device
            np.testing.assert_array_equal(shard.data, np.asarray(b)[shard.index])


def test_checkpoint_saved_under_zero3_on_8_restores_under_dp_on_2(tmp_path):
    zero3 = loop.make_plan("zero3", MODEL, BATCH, CPUS)
    state = loop.init_sharded_state(MODEL, OPTIMIZER, BATCH, SEED, zero3)
    assert _per_device_bytes(state.params) == _total_bytes(state.params) // N
    checkpointer = Checkpointer(tmp_path / "ckpt", keep_best=0)
    checkpointer.save(1, state, {"note": "zero3"}, force=True)
    checkpointer.close()

    dp = loop.make_plan("dp", MODEL, BATCH, CPUS[:2])
    restored, meta = Checkpointer(tmp_path / "ckpt", keep_best=0).restore(
        loop.abstract_state(MODEL, OPTIMIZER, BATCH, SEED, dp))
    assert meta["note"] == "zero3"
    shardings = loop.state_shardings(dp, restored)
    for got, want, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(shardings)):
        np.testing.assert_array_equal(got, want)
        assert got.sharding.is_equivalent_to(sharding, got.ndim)
        assert {d.id for d in got.devices()} == {d.id for d in CPUS[:2]}


def _mesh_yaml(tmp_path, axes: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(f"axes: {axes}\nzero_stage: 0\nrules:\n  - [batch, data]\n  - [heads, tensor]\n")
    return str(path)


@pytest.mark.parametrize("axes, message", [
    ("{data: 3, tensor: 1}", r"axes \{'data': 3, 'tensor': 1\} need 3 devices, got 8"),
    ("{data: -1, tensor: 3}", r"need a multiple of 3 devices, got 8"),
    ("{data: 1, tensor: 8}", r"\('heads', size 2\) is not divisible by mesh axis 'tensor' of size 8"),
])
def test_bad_mesh_fails_at_start(tmp_path, axes, message):
    model, _ = _setup(nhead=2)
    with pytest.raises(ValueError, match=message):
        loop.make_plan(_mesh_yaml(tmp_path, axes), model, BATCH, CPUS)


def test_cli_trains_under_zero3(tmp_path):
    """``python -m lsjax.train --mesh zero3`` end to end on 8 fake devices (odd batch rows get padded)."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "lsjax.train", "--config", "tiny-synthetic", "--mesh", "zero3",
           "--run-dir", str(run_dir), "steps=3", "log_every=1", "eval.every=3", "eval.bleu=false", "eval.batch_size=16",
           "checkpoint.every=3", "data.synthetic_pairs=600", "data.buckets=[24]", "data.max_batch_tokens=240",
           "compilation_cache=null", "model_overrides={num_encoder_layers: 1, num_decoder_layers: 1}"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONPATH": str(ROOT),
           "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mesh 'zero3': {'data': 8, 'tensor': 1} over 8 device(s), ZeRO stage 3" in done.stdout
    records = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"kind": "train"' in line]
    assert len(records) == 3
    assert (run_dir / "checkpoints" / "3").is_dir()
