"""The training loop (issue 5): resume equivalence, Ctrl-C, compilations per bucket and the
persistent cache, fp16 loss scaling, latest + best checkpoints, the saved best averaged params,
bad config and input, 12 bytes/param.

One cold fp16 run (two bucket shapes) fills a module-scoped JAX compilation cache; the later runs
of the same configuration load their programs from it, which keeps this file to a few minutes on
two CPU cores. Training is deterministic on CPU, so the resume checks compare floats exactly.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from lsjax import data as lsdata
from lsjax import optim
from lsjax.training import loop
from lsjax.training.checkpoint import Checkpointer, read_meta
from lsjax.training.config import config_from_dict, config_to_dict, load_train_config
from lsjax.training.data import prepare_data
from lsjax.training.metrics import NonFiniteLossError, enable_compilation_cache, read_metrics
from lsjax.training.step import token_loss

REPO = Path(__file__).resolve().parents[1]
STEPS = 30
INITIAL_SCALE = 2.0**30  # overflows float16 grads: the first steps are skipped
STOP_AFTER = 16  # the Ctrl-C'd run gets SIGINT once it has logged this step (its skips end ~12)
AVG_EVERY = 5  # eval.every of the eval.average_last=2 run
TINY = [
    "precision=fp16", f"loss_scale.initial={INITIAL_SCALE}", f"loss_scale.max_scale={INITIAL_SCALE}",
    "model_overrides.num_encoder_layers=1", "model_overrides.num_decoder_layers=1",
    "data.synthetic_pairs=300", "data.buckets=[8,16]", "data.max_batch_tokens=512",
    "optimizer.warmup_steps=10", "eval.bleu=false", "eval.every=10", "eval.select_by=valid_nll",
    "checkpoint.every=5", "checkpoint.keep=2", "checkpoint.keep_best=1", "log_every=1", f"steps={STEPS}",
]
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # compiled or loaded from the cache
CACHE_MISS, CACHE_HIT = "/jax/compilation_cache/cache_misses", "/jax/compilation_cache/cache_hits"


def tiny_config(run_dir: Path, cache_dir: Path, *overrides: str):
    return load_train_config("tiny-synthetic", [*TINY, f"run_dir={run_dir}", f"compilation_cache={cache_dir}",
                                                *overrides])


def train_records(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir / "metrics.jsonl", "train")


def abstract_state(config, run_dir: Path):
    tokenizer = lsdata.Tokenizer.load(run_dir / "spm.model")
    model = loop.build_model(config, tokenizer.vocab_size)
    optimizer, _ = loop.build_optimizer(config)
    sample = {k: np.zeros((1, config.data.buckets[0]), np.int32) for k in lsdata.BATCH_KEYS}
    return model, optimizer, sample, jax.eval_shape(lambda: loop.init_state(model, optimizer, sample, config.seed))


def restore(config, run_dir: Path, step: int):
    *_, abstract = abstract_state(config, run_dir)
    with Checkpointer(run_dir / "checkpoints") as checkpointer:
        return checkpointer.restore(abstract, step)


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)


def cache_files(cache_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(cache_dir)) for p in cache_dir.rglob("*") if p.is_file())


class JaxEvents:
    """Records JAX monitoring events as ``(event, fun_name)``."""

    def __init__(self):
        self.events: list[tuple[str, str | None]] = []

    def _event(self, event, **kwargs):
        self.events.append((event, kwargs.get("fun_name")))

    def _duration(self, event, duration, **kwargs):
        self._event(event, **kwargs)

    def since(self, mark: int) -> list[tuple[str, str | None]]:
        return self.events[mark:]


def count(events, name: str, fun_name: str | None = None) -> int:
    return sum(e == name and (fun_name is None or f == fun_name) for e, f in events)


@pytest.fixture(scope="module")
def jax_events():
    events = JaxEvents()
    jax.monitoring.register_event_listener(events._event)
    jax.monitoring.register_event_duration_secs_listener(events._duration)
    yield events
    jax.monitoring.unregister_event_listener(events._event)
    jax.monitoring.unregister_event_duration_listener(events._duration)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A fresh persistent compilation cache for this module; JAX's settings are restored after."""
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    saved = {k: getattr(jax.config, k) for k in keys}
    yield tmp_path_factory.mktemp("jax_cache")
    for k, v in saved.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_dir, jax_events):
    """Run A: STEPS steps without interruption (compiles everything cold)."""
    run_dir = tmp_path_factory.mktemp("straight")
    config = tiny_config(run_dir, cache_dir)
    mark = len(jax_events.events)
    summary = loop.train(config)
    return SimpleNamespace(config=config, run_dir=run_dir, summary=summary, events=jax_events.since(mark),
                           cache_files=cache_files(cache_dir))


def _wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"lsjax.train exited (rc {proc.returncode}) before step {step}:\n{log.read_text()[-3000:]}")
        complete = metrics.read_text().split("\n")[:-1] if metrics.exists() else []
        if any(r["kind"] == "train" and r["step"] >= step for r in map(json.loads, complete)):
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"lsjax.train did not reach step {step} in {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, cache_dir, jax_events, straight):
    """Run B, same config as A, stopped twice: ``max_steps_this_run=2`` (in the float16 skip phase),
    then a ``python -m lsjax.train`` subprocess Ctrl-C'd after STOP_AFTER steps, then resumed to STEPS."""
    run_dir = tmp_path_factory.mktemp("interrupted")
    config = tiny_config(run_dir, cache_dir)
    mark = len(jax_events.events)
    first = loop.train(config, max_steps_this_run=2)
    first_events, first_cache_files = jax_events.since(mark), cache_files(cache_dir)
    state_at_2, meta_at_2 = restore(config, run_dir, 2)  # kept only until later saves rotate it out

    log = run_dir / "ctrl_c.log"
    command = [sys.executable, "-m", "lsjax.train", "--config", "tiny-synthetic", *TINY, "steps=100000",
               f"run_dir={run_dir}", f"compilation_cache={cache_dir}"]
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            _wait_for_step(proc, run_dir / "metrics.jsonl", STOP_AFTER, log, timeout=300)
            proc.send_signal(signal.SIGINT)
            returncode = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    stopped_at, stop_meta = read_meta(run_dir / "checkpoints")
    logged_before_resume = [r["step"] for r in train_records(run_dir)]

    mark = len(jax_events.events)
    summary = loop.train(config)
    return SimpleNamespace(config=config, run_dir=run_dir, first=first, first_events=first_events,
                           first_cache_files=first_cache_files, state_at_2=state_at_2, meta_at_2=meta_at_2,
                           returncode=returncode, log=log.read_text(), stopped_at=stopped_at, stop_meta=stop_meta,
                           logged_before_resume=logged_before_resume, summary=summary,
                           resume_events=jax_events.since(mark))


@pytest.fixture(scope="module")
def averaged_run(tmp_path_factory, cache_dir):
    """Run C: A's config with ``eval.average_last=2`` and an eval every AVG_EVERY steps, stopped
    (``max_steps_this_run``) after the third eval and resumed to STEPS."""
    run_dir = tmp_path_factory.mktemp("averaged")
    config = tiny_config(run_dir, cache_dir, "eval.average_last=2", f"eval.every={AVG_EVERY}")
    loop.train(config, max_steps_this_run=3 * AVG_EVERY)
    first_meta = loop.read_averaged(run_dir)
    summary = loop.train(config)
    return SimpleNamespace(config=config, run_dir=run_dir, first_meta=first_meta, summary=summary,
                           evals={r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl", "eval")})


# 1. Resume equivalence and Ctrl-C


def test_resumed_run_equals_uninterrupted_bit_for_bit(straight, interrupted):
    a, b = train_records(straight.run_dir), train_records(interrupted.run_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))  # each step once
    for key in ("loss", "loss_scale", "skipped_steps"):
        assert [r[key] for r in b] == [r[key] for r in a], key
    state_a, meta_a = restore(straight.config, straight.run_dir, STEPS)
    state_b, meta_b = restore(interrupted.config, interrupted.run_dir, STEPS)
    assert_trees_equal(state_a, state_b)  # params, moments, loss scale, skipped count, step, RNG
    assert meta_a["data"] == meta_b["data"]


def test_max_steps_this_run_stops_with_a_checkpoint(interrupted):
    assert interrupted.first["steps"] == 2
    assert int(interrupted.state_at_2.step) == 2
    data = prepare_data(interrupted.config.data, interrupted.run_dir, seed=interrupted.config.seed)
    for _ in range(2):
        next(data.train)
    assert interrupted.meta_at_2["data"] == data.train.state()


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(interrupted):
    assert interrupted.returncode == 0, interrupted.log[-3000:]
    assert "Ctrl-C" in interrupted.log
    stopped_at = interrupted.stopped_at
    assert STOP_AFTER <= stopped_at < STEPS, f"SIGINT landed at step {stopped_at}; the resume would be untested"
    # the checkpoint is the last logged step, and the resumed run went on from the step after it
    assert interrupted.logged_before_resume == list(range(1, stopped_at + 1))
    data = prepare_data(interrupted.config.data, interrupted.run_dir, seed=interrupted.config.seed)
    for _ in range(stopped_at):
        next(data.train)
    assert interrupted.stop_meta["data"] == data.train.state()  # the data position of step stopped_at
    assert interrupted.summary["steps"] == STEPS


# 2. Compilations = buckets used; the persistent cache


def test_compiled_step_programs_equal_bucket_shapes_used(straight):
    config, summary = straight.config, straight.summary
    data = prepare_data(config.data, straight.run_dir, seed=config.seed)
    shapes = {next(data.train)["src"].shape for _ in range(STEPS)}
    assert len(shapes) == 2  # both buckets occur, so the check below is not vacuous
    assert set(summary["compiled_step_shapes"]) == {str(s) for s in shapes}
    assert summary["num_step_programs"] == len(shapes) <= len(config.data.buckets)
    assert train_records(straight.run_dir)[-1]["programs"] == len(shapes)
    assert count(straight.events, BACKEND_COMPILE, "jit(train_step)") == len(shapes)  # XLA's own count
    # Compiled ahead, in parallel; the time to train still counts it.
    assert 0 < summary["step_compile_wall_seconds"] <= summary["train_seconds"]


def test_second_run_compiles_nothing_new(straight, interrupted):
    """Run B's first part has A's config in a fresh run dir (a new ``jax.jit``): every program
    comes from the persistent cache and the cache directory does not grow. A resumed run (restored,
    committed arrays) also reuses the programs of a fresh one."""
    assert count(straight.events, CACHE_MISS) > 0  # A wrote the cache
    for events in (interrupted.first_events, interrupted.resume_events):
        assert count(events, CACHE_MISS) == 0
        assert count(events, CACHE_HIT) >= 1
        assert count(events, BACKEND_COMPILE, "jit(train_step)") >= 1  # obtained, from the cache
    assert interrupted.first_cache_files == straight.cache_files


def test_compilation_cache_follows_the_configured_directory(tmp_path, cache_dir):
    """JAX opens its persistent cache once per process; a run configured with another directory
    must still write there (e.g. two ``train()`` calls in one process)."""
    try:
        for factor, name in enumerate(("one", "two"), start=2):
            path = Path(enable_compilation_cache(str(tmp_path / name)))
            jax.jit(lambda x: x * factor)(jnp.arange(5.0)).block_until_ready()
            assert cache_files(path), f"nothing cached under {path}"
    finally:
        enable_compilation_cache(str(cache_dir))


# 3. float16 dynamic loss scaling in the loop


def test_fp16_overflow_skips_steps_and_halves_the_scale(straight):
    records = train_records(straight.run_dir)
    scales = [r["loss_scale"] for r in records]  # the scale each step used
    skipped = [0] + [r["skipped_steps"] for r in records]
    assert scales[0] == INITIAL_SCALE and skipped[1:4] == [1, 2, 3]  # 2**30 overflows: steps skipped
    for t in range(1, STEPS):
        was_skipped = skipped[t] - skipped[t - 1]
        assert was_skipped in (0, 1)
        assert scales[t] == (scales[t - 1] / 2 if was_skipped else scales[t - 1]), f"step {t + 1}"
    clean = STEPS - skipped[-1]
    assert clean >= 10, f"only {clean} of {STEPS} steps applied"


def test_fp16_skipped_step_leaves_params_and_moments_unchanged(straight, interrupted):
    state = interrupted.state_at_2  # after two overflowing steps
    model, optimizer, sample, _ = abstract_state(interrupted.config, interrupted.run_dir)
    initial = loop.init_state(model, optimizer, sample, interrupted.config.seed)
    assert_trees_equal(state.params, initial.params)
    assert all(p.dtype == jnp.float16 for p in jax.tree.leaves(state.params))
    adam = state.opt_state.inner_state
    assert int(adam.count) == 0
    assert all(not np.any(np.asarray(m)) for m in jax.tree.leaves((adam.mu, adam.nu)))
    assert float(state.opt_state.loss_scale.loss_scale) == INITIAL_SCALE / 4
    assert int(state.opt_state.skipped_steps) == 2


def test_fp16_run_converges_after_the_skips(straight):
    losses = [r["loss"] for r in train_records(straight.run_dir)]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    nll = {r["step"]: r["valid_nll"] for r in read_metrics(straight.run_dir / "metrics.jsonl", "eval")}
    assert nll[STEPS] < nll[10] - 0.5


# 4. Checkpoints: N latest + best


def test_checkpointer_keeps_latest_and_best_and_restores_onto_abstract_state(tmp_path):
    tree = {"w": jnp.arange(6, dtype=jnp.float16).reshape(2, 3), "n": jnp.zeros((), jnp.int32)}
    nll = {1: 5.0, 2: 3.0, 3: 4.0, 4: None, 5: 4.5, 6: None}
    with Checkpointer(tmp_path, keep=2, keep_best=1, best_metric="valid_nll", best_mode="min") as ck:
        for step, value in nll.items():
            state = jax.tree.map(lambda x: x + step, tree)
            assert ck.save(step, state, {"step": step}, None if value is None else {"valid_nll": value})
        assert not ck.save(6, tree, {"step": -1}, force=True)  # a saved step is left as it is
        ck.wait()
        assert ck.manager.all_steps() == [2, 5, 6] and ck.best_step() == 2
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
        restored, meta = ck.restore(abstract, 2)
        assert_trees_equal(restored, jax.tree.map(lambda x: x + 2, tree))
        assert meta == {"step": 2, "metrics": {"valid_nll": 3.0}}
        _, latest_meta = ck.restore(abstract)
        assert latest_meta["step"] == 6
    with Checkpointer(tmp_path / "bleu", keep=1, keep_best=1, best_metric="bleu", best_mode="max") as ck:
        for step, bleu in enumerate([10.0, 30.0, 20.0], start=1):
            ck.save(step, tree, {}, {"bleu": bleu})
        ck.wait()
        assert ck.manager.all_steps() == [2, 3] and ck.best_step() == 2


def test_run_keeps_latest_and_best_by_the_validation_metric(straight):
    nll = {r["step"]: r["valid_nll"] for r in read_metrics(straight.run_dir / "metrics.jsonl", "eval")}
    assert sorted(nll) == [10, 20, STEPS]
    best = min(nll, key=nll.get)  # eval.select_by=valid_nll: lower is better
    assert straight.summary["best_step"] == best
    with Checkpointer(straight.run_dir / "checkpoints", best_metric="valid_nll", best_mode="min") as ck:
        assert set(ck.manager.all_steps()) == {STEPS - 5, STEPS} | {best}
    _, params, _, buckets = loop.load_for_inference(straight.run_dir)  # the best, onto an abstract state
    state, meta = restore(straight.config, straight.run_dir, best)
    assert_trees_equal(params, state.params)
    assert meta["metrics"]["valid_nll"] == pytest.approx(nll[best])
    assert tuple(buckets) == straight.config.data.buckets


def test_best_checkpoint_by_valid_nll_is_the_lowest(tmp_path):
    """The loop's (and ``load_for_inference``'s) best by valid_nll is the lowest, not the latest."""
    config = load_train_config("tiny-synthetic", ["eval.bleu=false", f"run_dir={tmp_path}"])
    metric, mode = loop._best_metric(config)
    tree = {"w": jnp.zeros(3)}
    with Checkpointer(tmp_path, keep=1, keep_best=1, best_metric=metric, best_mode=mode) as ck:
        for step, value in enumerate([3.0, 1.0, 2.0], start=1):
            ck.save(step, tree, {}, {"valid_nll": value})
        ck.wait()
        assert ck.best_step() == 2


def test_average_params_is_the_float32_mean_rounded_once():
    trees = [{"w": jnp.asarray([1.0, 2.0], jnp.bfloat16), "b": jnp.asarray(3.0)},
             {"w": jnp.asarray([2.0, 2.015625], jnp.bfloat16), "b": jnp.asarray(5.0)}]
    avg = loop.average_params(trees)
    assert avg["w"].dtype == jnp.bfloat16 and avg["b"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(avg["w"], np.float32), [1.5, 2.0])  # 2.0078125, a tie: to even
    assert float(avg["b"]) == 4.0


def test_eval_reports_the_average_of_the_last_evaluations(averaged_run):
    """eval.average_last=2: every eval also scores the mean of this and the previous eval's params; at
    the first eval of each part of the run (the window starts again after a resume) the window holds
    one tree, so the averaged scores are the plain ones. Steps 5 and 10 are in the fp16 skip phase."""
    evals = averaged_run.evals
    assert sorted(evals) == list(range(AVG_EVERY, STEPS + 1, AVG_EVERY))
    for step in (5, 10, 20):
        assert evals[step]["avg_valid_nll"] == evals[step]["valid_nll"]
    for step in (15, 25, 30):
        assert evals[step]["avg_valid_nll"] != evals[step]["valid_nll"]
        assert np.isfinite(evals[step]["avg_valid_nll"])


def _eval_nll(config, run_dir: Path, model, params) -> float:
    optimizer, _ = loop.build_optimizer(config)
    data = prepare_data(config.data, run_dir, seed=config.seed)
    sample = data.sample_batch()
    plan = loop.make_plan(config.mesh, model, sample)
    abstract = loop.abstract_state(model, optimizer, sample, config.seed, plan)
    _, eval_step = loop.compile_steps(model, optimizer, plan, abstract, label_smoothing=config.label_smoothing)
    return loop.evaluate(eval_step, params, data.valid_batches(), plan)["valid_nll"]


def test_best_averaged_params_are_saved_and_reproduce_their_score(averaged_run):
    """``<run_dir>/averaged/`` holds the averaged params with the lowest avg_valid_nll of the whole run
    (both parts), in the params' dtype: the mean of the checkpoints it averaged, scoring as logged."""
    run_dir, config, evals = averaged_run.run_dir, averaged_run.config, averaged_run.evals
    best = min(evals, key=lambda s: evals[s]["avg_valid_nll"])
    meta = loop.read_averaged(run_dir)
    assert meta["step"] == averaged_run.summary["averaged_best_step"] == best
    assert meta["averaged_steps"] == [best - AVG_EVERY, best]  # a real average of two evals' params
    assert meta["metric"] == "avg_valid_nll" and meta["scores"] == pytest.approx(
        {k: v for k, v in evals[best].items() if "valid" in k})
    first_part = [s for s in evals if s <= 3 * AVG_EVERY]
    assert averaged_run.first_meta["step"] == min(first_part, key=lambda s: evals[s]["avg_valid_nll"])
    assert [p.name for p in run_dir.glob("averaged*")] == ["averaged"]  # no temporary folder left

    model, params, _, buckets = loop.load_for_inference(run_dir, averaged=True)
    assert tuple(buckets) == config.data.buckets
    averaged = [restore(config, run_dir, s)[0].params for s in meta["averaged_steps"]]
    assert_trees_equal(params, loop.average_params(averaged))  # float16 leaves, like the checkpoints'
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(averaged[-1])))
    assert _eval_nll(config, run_dir, model, params) == pytest.approx(evals[best]["avg_valid_nll"], rel=1e-6)


def test_best_averaged_score_survives_a_resume(averaged_run, tmp_path, cache_dir):
    """A resumed run compares its averages with the saved one: given an unbeatable saved score, the
    eval at the new last step saves nothing."""
    run_dir = tmp_path / "run"
    shutil.copytree(averaged_run.run_dir, run_dir)
    meta = loop.read_averaged(run_dir)
    meta["scores"]["avg_valid_nll"] = 0.0
    (run_dir / "averaged" / "meta.json").write_text(json.dumps(meta))
    config = tiny_config(run_dir, cache_dir, "eval.average_last=2", f"eval.every={AVG_EVERY}", f"steps={STEPS + 2}")
    summary = loop.train(config)
    assert read_metrics(run_dir / "metrics.jsonl", "eval")[-1]["step"] == STEPS + 2
    assert loop.read_averaged(run_dir) == meta
    assert summary["averaged_best_step"] == meta["step"]
    _, params, _, _ = loop.load_for_inference(run_dir, averaged=True)
    assert_trees_equal(params, loop.load_for_inference(averaged_run.run_dir, averaged=True)[1])


def test_load_for_inference_averaged_needs_an_averaged_model(straight, averaged_run):
    with pytest.raises(FileNotFoundError, match=r"no averaged model in .*averaged: .*eval.average_last=1\)"):
        loop.load_for_inference(straight.run_dir, averaged=True)
    with pytest.raises(ValueError, match="either a checkpoint step or averaged=True"):
        loop.load_for_inference(averaged_run.run_dir, step=STEPS, averaged=True)


# 5. Bad config and input


@pytest.mark.parametrize(
    "override, message",
    [
        ("stepz=3", r"unknown key\(s\) \['stepz'\] in train config"),
        ("optimizer.lrr=1e-3", r"unknown key\(s\) \['lrr'\] in optimizer\."),
        ("data=3", r"data must be a mapping"),
        ("steps", r"must look like key=value"),
        ("precision=fp8", r"precision must be"),
        ("data.overlong=chop", r"data.overlong must be one of"),
        ("eval.select_by=loss", r"eval.select_by must be"),
        ("checkpoint.keep=0", r"checkpoint needs"),
        ("eval.average_last=0", r"eval.average_last must be >= 1"),
    ],
)
def test_bad_config_is_a_clear_error(override, message):
    with pytest.raises(ValueError, match=message):
        load_train_config("tiny-synthetic", [override])


def test_config_round_trips_through_json():
    config = load_train_config("tiny-synthetic", TINY)
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config
    with pytest.raises(FileNotFoundError, match="no train config named"):
        load_train_config("no-such-config")


def test_overlong_pairs_are_dropped_or_truncated_and_counted(straight, capsys):
    base = dataclasses.replace(straight.config.data, buckets=(8,))
    run = lambda policy: prepare_data(dataclasses.replace(base, overlong=policy), straight.run_dir, seed=0)
    dropped = run("drop")
    stats = dropped.stats["train"]
    assert 0 < stats["dropped"] < stats["num_pairs"] and stats["truncated"] == 0
    assert stats["num_examples"] == stats["num_pairs"] - stats["dropped"]
    assert f"{stats['dropped']} dropped and 0 truncated of {stats['num_pairs']} pairs" in capsys.readouterr().out
    truncated = run("truncate").stats["train"]
    assert truncated["truncated"] == stats["dropped"] and truncated["dropped"] == 0
    assert truncated["num_examples"] == truncated["num_pairs"]
    with pytest.raises(ValueError, match="over the longest bucket 8"):
        run("error")


def test_nan_loss_stops_the_run_naming_the_step(tmp_path, cache_dir, monkeypatch):
    """bf16 has no loss scale: a NaN loss would only skip steps silently. Poison the params at
    step 4; the run must stop there with a clear error, keeping step 2's checkpoint and saving
    nothing at the checkpoint step 4."""
    make_train_step = loop.make_train_step

    def poisoned_make_train_step(*args, **kwargs):
        step_fn = make_train_step(*args, **kwargs)

        def train_step(state, batch):
            poison = jnp.where(state.step == 3, jnp.nan, 1.0)
            return step_fn(state.replace(params=jax.tree.map(lambda p: (p * poison).astype(p.dtype),
                                                             state.params)), batch)

        return train_step

    monkeypatch.setattr(loop, "make_train_step", poisoned_make_train_step)
    config = tiny_config(tmp_path, cache_dir, "precision=bf16", "model_overrides.num_decoder_layers=0",
                         "data.buckets=[16]", "checkpoint.every=2", "steps=10", "eval.every=100")
    with pytest.raises(NonFiniteLossError, match="training loss is nan at step 4"):
        loop.train(config)
    records = train_records(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["loss_scale"] == 1.0 and r["skipped_steps"] == 0 and np.isfinite(r["loss"]) for r in records)
    with Checkpointer(tmp_path / "checkpoints") as ck:
        assert ck.manager.all_steps() == [2]
    state, _ = restore(config, tmp_path, 2)
    assert all(np.isfinite(np.asarray(p, np.float32)).all() for p in jax.tree.leaves(state.params))


# 6. Memory: 12 bytes per parameter


def _bytes_per_param(config, optimizer) -> tuple[float, object, object, object]:
    model = loop.build_model(config, vocab_size=128)
    sample = {k: np.zeros((1, 8), np.int32) for k in lsdata.BATCH_KEYS}
    state = jax.eval_shape(lambda: loop.init_state(model, optimizer, sample, 0))
    batch = {k: jax.ShapeDtypeStruct((4, 8), jnp.int32) for k in lsdata.BATCH_KEYS}
    loss = lambda p, b: token_loss(model, p, b, label_smoothing=0.1, deterministic=True)[0]
    grads = jax.eval_shape(jax.grad(loss), state.params, batch)
    return optim.state_bytes_per_param(state.params, grads, state.opt_state), state.params, grads, state.opt_state


def test_bf16_params_with_fp32_moments_take_12_bytes_per_param():
    """Shapes and dtypes of the real pytrees (``jax.eval_shape`` of init, grad and optimizer init)."""
    config = load_train_config("tiny-synthetic", ["precision=bf16"])
    optimizer, _ = loop.build_optimizer(config)
    per_param, params, grads, opt_state = _bytes_per_param(config, optimizer)
    assert {x.dtype for x in jax.tree.leaves((params, grads))} == {jnp.dtype(jnp.bfloat16)}
    adam = opt_state.inner_state
    assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.float32)}
    assert isinstance(opt_state.loss_scale, optim.NoOpLossScale)  # bf16: no loss scale
    assert 12.0 <= per_param < 12.001, per_param  # + a step count and a skipped-step count

    fp32 = load_train_config("tiny-synthetic", ["precision=fp32"])
    reference, *_ = _bytes_per_param(fp32, optax.adamw(1e-3))
    assert 16.0 <= reference < 16.001, reference


def test_master_weights_baseline_keeps_fp32_params_and_optax_adamw():
    """``master_weights=true``: fp32 params, bf16 compute, optax's AdamW state; one step equals optax's."""
    config = load_train_config("tiny-synthetic", ["precision=bf16", "master_weights=true",
                                                  "model_overrides.num_encoder_layers=1",
                                                  "model_overrides.num_decoder_layers=1"])
    optimizer, _ = loop.build_optimizer(config)
    per_param, params, grads, opt_state = _bytes_per_param(config, optimizer)
    assert {x.dtype for x in jax.tree.leaves((params, grads))} == {jnp.dtype(jnp.float32)}
    assert isinstance(opt_state.inner_state[0], optax.ScaleByAdamState)  # optax's own transform
    assert 16.0 <= per_param < 16.001, per_param
    model = loop.build_model(config, vocab_size=128)
    assert model.config.dtype == jnp.bfloat16 and model.config.param_dtype == jnp.float32

    rng = np.random.default_rng(0)
    batch = {k: jnp.asarray(rng.integers(3, 128, (4, 8)), jnp.int32) for k in lsdata.BATCH_KEYS}
    sample = {k: np.asarray(v) for k, v in batch.items()}
    state = loop.init_state(model, optimizer, sample, 0)
    new_state, metrics = jax.jit(loop.make_train_step(model, optimizer, label_smoothing=0.1))(state, batch)
    assert int(metrics["skipped_steps"]) == 0
    o = config.optimizer
    tx = optax.adamw(optim.inverse_sqrt_schedule(o.lr, o.warmup_steps), o.b1, o.b2, o.eps,
                     weight_decay=o.weight_decay)
    dropout_key = jax.random.split(jax.random.wrap_key_data(state.rng))[1]
    loss = lambda p: token_loss(model, p, batch, label_smoothing=0.1, deterministic=False,  # noqa: E731
                                dropout_key=dropout_key)

    @jax.jit
    def optax_step(params):
        def mean_loss(p):
            total, count = loss(p)
            return total / jnp.maximum(count, 1).astype(jnp.float32)

        updates, _ = tx.update(jax.grad(mean_loss)(params), tx.init(params), params)
        return optax.apply_updates(params, updates)

    expected = optax_step(state.params)
    for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------ lsjax-translate --

SOURCES = ["a", "the cat sat on the mat", "b c", "one two three four five six seven eight nine ten eleven", "d e f"]


def _translate_cli(capsys, run_dir: Path, *args: str) -> list[str]:
    from lsjax import translate

    assert translate.main(["--checkpoint", str(run_dir), *args]) == 0
    return capsys.readouterr().out.splitlines()


def test_translate_cli_writes_one_line_per_input_in_order(straight, tmp_path, capsys, jax_events):
    from lsjax import translate

    src = tmp_path / "src.txt"
    src.write_text("\n".join(SOURCES) + "\n")
    lines = _translate_cli(capsys, straight.run_dir, "--input", str(src), "--beam", "3", "--batch-size", "2")
    assert len(lines) == len(SOURCES)
    model, params, tokenizer, buckets = loop.load_for_inference(straight.run_dir)
    translator = translate.Translator(model, tokenizer, buckets, batch_size=2, beam_size=3)
    mark = len(jax_events.events)
    assert translator.translate(params, SOURCES) == lines
    assert translator.translate(params, SOURCES[::-1]) == lines[::-1]  # rows are put back in input order
    # One decode program per source bucket used (batch fixed per bucket), never more.
    used = {next((b for b in buckets if len(ids) <= b), buckets[-1]) for ids in tokenizer.encode_batch(SOURCES)}
    assert len(used) == 2  # both buckets occur, so the check is not vacuous
    assert count(jax_events.since(mark), BACKEND_COMPILE, "jit(_decode_ids)") == len(used)


def test_translate_cli_sampling_and_max_len(straight, tmp_path, capsys):
    src = tmp_path / "src.txt"
    src.write_text("\n".join(SOURCES) + "\n")
    run = lambda *a: _translate_cli(capsys, straight.run_dir, "--input", str(src), *a)  # noqa: E731
    top1 = run("--sampling", "top_k=1,seed=3")
    assert top1 == run("--sampling", "top_k=1,seed=5")  # top_k=1 leaves nothing to chance
    assert run("--sampling", "top_p=0.9,temperature=0.8,seed=1") == run("--sampling", "top_p=0.9,temperature=0.8,seed=1")
    _, _, tokenizer, _ = loop.load_for_inference(straight.run_dir)
    assert all(len(tokenizer.encode(line)) <= 2 for line in run("--max-len", "2"))
    with pytest.raises(ValueError, match="top_k=,top_p=,temperature=,seed="):
        run("--sampling", "nucleus=0.9")


def test_translate_cli_averaged_loads_the_averaged_params(averaged_run, capsys, monkeypatch):
    from lsjax import translate

    with pytest.raises(SystemExit):
        translate.main(["--checkpoint", str(averaged_run.run_dir), "--averaged", "--step", "5"])
    assert "not allowed with argument" in capsys.readouterr().err
    calls, load_for_inference = [], loop.load_for_inference

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return load_for_inference(*args, **kwargs)

    monkeypatch.setattr(loop, "load_for_inference", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("a\nb c\n"))
    assert len(_translate_cli(capsys, averaged_run.run_dir, "--averaged", "--beam", "1")) == 2
    assert calls == [{"step": None, "averaged": True}]


def test_translator_with_while_loop_graphs_gives_the_same_translations(straight):
    """The decode loop compiled with XLA command buffers around it (a no-op on the CPU) decodes the same."""
    from lsjax import decode, translate

    model, params, tokenizer, buckets = loop.load_for_inference(straight.run_dir)
    plain = translate.Translator(model, tokenizer, buckets, beam_size=2)
    graphs = translate.Translator(model, tokenizer, buckets, beam_size=2, compiler_options=decode.WHILE_LOOP_GRAPHS)
    assert graphs.translate(params, SOURCES) == plain.translate(params, SOURCES)


def test_precompile_compiles_every_shape_once_in_parallel():
    from lsjax.training.metrics import ShapeCompileTracker

    fn = jax.jit(lambda x, y: (x * 2 + y).sum(axis=0))
    tracker = ShapeCompileTracker(fn, signature=lambda x, y: x.shape)
    specs = [(jax.ShapeDtypeStruct((n, 3), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32)) for n in (2, 5, 2)]
    tracker.precompile(specs)
    assert len(tracker) == 2 and set(tracker.compile_seconds) == {(2, 3), (5, 3)}
    assert tracker.precompile_seconds > 0
    for n in (2, 5):
        x = jnp.arange(3 * n, dtype=jnp.float32).reshape(n, 3)
        np.testing.assert_array_equal(tracker(x, jnp.float32(1)), x.sum(axis=0) * 2 + n)
    assert fn._cache_size() == 0  # the calls ran the precompiled executables, jit compiled nothing
    assert len(tracker) == 2
