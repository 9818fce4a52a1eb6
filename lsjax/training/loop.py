"""The training loop behind ``lsjax-train``: data, model, optimizer, checkpoints, eval, metrics."""

from __future__ import annotations

import collections
import contextlib
import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from lsjax import data as lsdata
from lsjax import ops, optim
from lsjax.models import Transformer, load_model_config
from lsjax.parallel import ShardingPlan, load_mesh_config, make_mesh, maybe_initialize_distributed
from lsjax.training.checkpoint import Checkpointer
from lsjax.training.config import TrainConfig, config_from_dict, config_to_dict
from lsjax.training.data import RunData, prepare_data
from lsjax.training.metrics import LossGuard, MetricsWriter, ShapeCompileTracker, enable_compilation_cache
from lsjax.training.step import TrainState, make_eval_step, make_train_step
from lsjax.translate import Translator

# precision name -> compute dtype (also the params' dtype unless master_weights)
COMPUTE_DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}


def build_model(config: TrainConfig, vocab_size: int) -> Transformer:
    dtype = COMPUTE_DTYPES[config.precision]
    param_dtype = jnp.float32 if config.master_weights else dtype
    model_config = load_model_config(config.model, vocab_size=vocab_size, dtype=dtype, param_dtype=param_dtype,
                                     **config.model_overrides)
    return Transformer(model_config)


def make_translator(config: TrainConfig, model, tokenizer) -> Translator:
    e = config.eval
    return Translator(model, tokenizer, config.data.buckets, batch_size=e.batch_size, beam_size=e.beam_size,
                      length_penalty=e.length_penalty)


def load_for_inference(run_dir: str | Path, step: int | None = None, *, averaged: bool = False):
    """``(model, params, tokenizer, buckets)`` from a run directory: the best checkpoint by default,
    checkpoint ``step``, or with ``averaged`` the best averaged params (``eval.average_last`` > 1)."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{run_dir} is not an lsjax-train run directory (no config.json)")
    config = config_from_dict(json.loads(config_file.read_text()))
    tokenizer = lsdata.Tokenizer.load(config.data.tokenizer or run_dir / "spm.model")
    model = build_model(config, tokenizer.vocab_size)
    optimizer, _ = build_optimizer(config)
    length = config.data.buckets[0]
    sample = {k: [[lsdata.PAD_ID] * length] for k in lsdata.BATCH_KEYS}
    plan = make_plan("single", model, sample)  # whatever mesh the run trained on
    abstract = abstract_state(model, optimizer, sample, config.seed, plan)
    if averaged:
        if step is not None:
            raise ValueError("pass either a checkpoint step or averaged=True, not both")
        if read_averaged(run_dir) is None:
            raise FileNotFoundError(f"no averaged model in {run_dir / AVERAGED}: it is saved at the evaluations "
                                    f"of runs with eval.average_last > 1 (this run has eval.average_last="
                                    f"{config.eval.average_last})")
        with ocp.StandardCheckpointer() as restorer:
            params = restorer.restore((run_dir / AVERAGED / "params").resolve(), abstract.params)
        return model, params, tokenizer, config.data.buckets
    best_metric, best_mode = _best_metric(config)
    checkpointer = Checkpointer(run_dir / "checkpoints", best_metric=best_metric, best_mode=best_mode)
    step = step if step is not None else checkpointer.best_step() or checkpointer.latest_step()
    state, _ = checkpointer.restore(abstract, step)
    checkpointer.close()
    return model, state.params, tokenizer, config.data.buckets


def build_optimizer(config: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``loss_scaled(chain([clip], adam|adamw|lion))`` with an inverse-sqrt warmup schedule;
    dynamic loss scaling for fp16, none (but still skip-on-inf/NaN) otherwise. The transform
    is lsjax's params-only one, or optax's own for ``master_weights`` (fp32 params)."""
    o = config.optimizer
    schedule = optim.inverse_sqrt_schedule(o.lr, o.warmup_steps)
    if config.master_weights:
        library, common = optax, {}
    else:
        library, common = optim, {"moment_dtype": jnp.dtype(o.moment_dtype), "rounding": o.rounding,
                                  "seed": config.seed}
    kernel = o.kernel
    if kernel == "auto":  # the fused in-place update where it applies (not behind a clipping chain)
        fused = (not config.master_weights and o.name != "lion" and o.moment_dtype == "float32"
                 and o.rounding == "nearest" and o.clip_norm == 0)
        kernel = "multi" if fused else "xla"
    if kernel != "xla" and (config.master_weights or o.name == "lion"):
        raise ValueError(f"optimizer.kernel={o.kernel!r} applies to lsjax's adam/adamw only (not "
                         f"{'master_weights' if config.master_weights else 'lion'}); use 'auto' or 'xla'")
    adam_kw = {} if config.master_weights else {"kernel": kernel}
    if o.name == "adamw":
        inner = library.adamw(schedule, o.b1, o.b2, o.eps, weight_decay=o.weight_decay, **common, **adam_kw)
    elif o.name == "adam":
        inner = library.adam(schedule, o.b1, o.b2, o.eps, **common, **adam_kw)
    elif o.name == "lion":
        inner = library.lion(schedule, o.b1, o.b2, weight_decay=o.weight_decay, **common)
    else:
        raise ValueError(f"optimizer.name must be 'adam', 'adamw' or 'lion', got {o.name!r}")
    if o.clip_norm > 0:
        inner = optax.chain(optax.clip_by_global_norm(o.clip_norm), inner)
    return optim.loss_scaled(inner, build_loss_scale(config)), schedule


def build_loss_scale(config: TrainConfig) -> optim.LossScale:
    """The configured dynamic loss scale for fp16; a no-op scale for bf16/fp32."""
    if config.precision != "fp16":
        return optim.NoOpLossScale()
    s = config.loss_scale
    return optim.DynamicLossScale.create(s.initial, period=s.growth_interval, factor=s.factor,
                                         min_loss_scale=s.min_scale, max_loss_scale=s.max_scale)


def init_state(model, optimizer, sample_batch: dict, seed: int) -> TrainState:
    init_key, train_key = jax.random.split(jax.random.key(seed))
    variables = model.init(init_key, jnp.asarray(sample_batch["src"][:1]), jnp.asarray(sample_batch["tgt_in"][:1]))
    params = nn.unbox(variables["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(train_key))


def make_plan(mesh: str, model, sample_batch: dict, devices: list[jax.Device] | None = None) -> ShardingPlan:
    """The :class:`ShardingPlan` of ``model`` on mesh config ``mesh`` (name in configs/mesh/ or a
    YAML path) over ``devices`` (default: all); ValueError naming the axis and sizes when the mesh
    does not tile the devices or does not divide a param dim."""
    cfg = load_mesh_config(mesh)
    src, tgt_in = (jnp.asarray(sample_batch[k][:1], jnp.int32) for k in ("src", "tgt_in"))
    boxed = jax.eval_shape(model.init, jax.random.key(0), src, tgt_in)["params"]
    return ShardingPlan.create(cfg, make_mesh(cfg, devices), boxed)


def state_shardings(plan: ShardingPlan, abstract: TrainState) -> TrainState:
    """Where each leaf of the train state lives: params and optimizer state per ``plan``, scalars replicated."""
    return TrainState(step=plan.replicated, params=plan.params, opt_state=plan.optimizer_state(abstract.opt_state),
                      rng=plan.replicated)


def abstract_state(model, optimizer, sample_batch: dict, seed: int, plan: ShardingPlan) -> TrainState:
    """Shapes, dtypes and shardings of the train state (a restore target), nothing allocated."""
    abstract = jax.eval_shape(lambda: init_state(model, optimizer, sample_batch, seed))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                        state_shardings(plan, abstract))


def init_sharded_state(model, optimizer, sample_batch: dict, seed: int, plan: ShardingPlan) -> TrainState:
    """:func:`init_state` created directly in its shards (no device ever holds more than its share).

    Traced without the logical rules: flax's boxed ``DenseGeneral`` init would pin its flat kernel.
    """
    init = lambda: init_state(model, optimizer, sample_batch, seed)  # noqa: E731
    return jax.jit(init, out_shardings=state_shardings(plan, jax.eval_shape(init)))()


def shard_batch(plan: ShardingPlan, batch: dict) -> dict[str, jax.Array]:
    """Host ``[B, L]`` int arrays -> device arrays split over ``plan.batch``; rows are padded (all-pad rows
    count for nothing) to a multiple of the devices the batch is split over."""
    pad = -len(batch["src"]) % plan.batch_divisor
    arrays = {k: np.pad(np.asarray(v, np.int32), ((0, pad), (0, 0)), constant_values=lsdata.PAD_ID)
              for k, v in batch.items()}
    return jax.device_put(arrays, plan.batch)


def batch_spec(plan: ShardingPlan, shape: tuple[int, int]) -> dict[str, jax.ShapeDtypeStruct]:
    """The abstract :func:`shard_batch` of host ``[B, L]`` batches (rows padded as it pads them)."""
    rows = shape[0] + (-shape[0] % plan.batch_divisor)
    return {k: jax.ShapeDtypeStruct((rows, shape[1]), jnp.int32, sharding=plan.batch) for k in lsdata.BATCH_KEYS}


def compile_steps(model, optimizer, plan: ShardingPlan, abstract: TrainState, *, label_smoothing: float):
    """``(train_step, eval_step)`` jitted on ``plan``'s mesh: ``train_step(state, batch) -> (state,
    metrics)`` donates the state; ``eval_step(params, batch) -> {"nll_sum", "tokens"}``."""
    shardings = state_shardings(plan, abstract)
    train_step = plan.jit(make_train_step(model, optimizer, label_smoothing=label_smoothing, plan=plan),
                          (shardings, plan.batch), (shardings, plan.replicated), donate_argnums=0)
    eval_step = plan.jit(make_eval_step(model, plan), (plan.params, plan.batch), plan.replicated)
    return train_step, eval_step


class _StopRequest:
    """First Ctrl-C asks the loop to checkpoint and stop; a second one interrupts at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Ctrl-C: saving a checkpoint, then stopping (press again to abort without saving)")

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)


def average_params(trees: list) -> Any:
    """Element-wise mean of same-structured param trees, in float32, rounded once to each leaf's dtype."""
    return jax.tree.map(lambda *xs: (sum(x.astype(jnp.float32) for x in xs) / len(xs)).astype(xs[0].dtype), *trees)


AVERAGED = "averaged"  # <run_dir>/averaged/{params,meta.json}: the run's best averaged params


def save_averaged(run_dir: Path, params: Any, record: dict[str, Any]) -> None:
    """Saves ``params`` (orbax, under ``params/``) and ``record`` (``meta.json``) as
    ``<run_dir>/averaged/``, replacing the previous ones: both are written to a temporary folder
    that is then renamed into place, so ``averaged/`` is never half-written."""
    final, tmp, old = (run_dir / f"{AVERAGED}{suffix}" for suffix in ("", ".tmp", ".old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with ocp.StandardCheckpointer() as saver:
        saver.save(tmp.resolve() / "params", params)
    (tmp / "meta.json").write_text(json.dumps(record, indent=2))
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def read_averaged(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``meta.json`` of the run's saved averaged params (None if there are none); puts the
    previous ones back if :func:`save_averaged` was stopped between its two renames."""
    run_dir = Path(run_dir)
    if not (run_dir / AVERAGED).exists() and (run_dir / f"{AVERAGED}.old").exists():
        (run_dir / f"{AVERAGED}.old").rename(run_dir / AVERAGED)
    meta = run_dir / AVERAGED / "meta.json"
    return json.loads(meta.read_text()) if meta.exists() else None


def evaluate(eval_step, params, batches: Iterator[dict], plan: ShardingPlan) -> dict[str, float]:
    """Token-level validation NLL and perplexity over all batches."""
    nll, tokens = 0.0, 0
    for batch in batches:
        out = eval_step(params, shard_batch(plan, batch))
        nll += float(out["nll_sum"])
        tokens += int(out["tokens"])
    mean = nll / max(tokens, 1)
    return {"valid_nll": mean, "valid_ppl": float(np.exp(min(mean, 50.0)))}


def train(config: TrainConfig, *, max_steps_this_run: int | None = None) -> dict[str, Any]:
    """Trains (resuming from ``run_dir`` if it has checkpoints); returns a summary dict.

    ``max_steps_this_run`` stops early after that many steps (with a checkpoint), as an
    interruption would; a later call resumes exactly where this one stopped. An inf/NaN training
    loss raises :class:`~lsjax.training.metrics.NonFiniteLossError` (naming the step) without
    saving that state.
    """
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config_to_dict(config), indent=2, default=str))
    maybe_initialize_distributed()
    cache_dir = enable_compilation_cache(config.compilation_cache)
    backend = ops.use_backend(config.backend) if config.backend else contextlib.nullcontext()
    with backend:
        return _train(config, run_dir, cache_dir, max_steps_this_run)


def _train(config: TrainConfig, run_dir: Path, cache_dir: str | None, max_steps_this_run: int | None):
    data: RunData = prepare_data(config.data, run_dir, seed=config.seed)
    model = build_model(config, data.tokenizer.vocab_size)
    optimizer, schedule = build_optimizer(config)
    sample = data.sample_batch()
    plan = make_plan(config.mesh, model, sample)
    abstract = abstract_state(model, optimizer, sample, config.seed, plan)
    best_metric, best_mode = _best_metric(config)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=config.checkpoint.keep,
                                keep_best=config.checkpoint.keep_best, best_metric=best_metric, best_mode=best_mode)
    if checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(abstract)  # onto this run's mesh, whatever mesh saved it
        data.train.restore(meta["data"])
        tqdm.write(f"resumed from step {int(state.step)} in {checkpointer.manager.directory}")
    else:  # created in its shards, committed like a restored state (same programs, cache hits on resume)
        state = init_sharded_state(model, optimizer, sample, config.seed, plan)
    tqdm.write(f"mesh {plan.config.name!r}: {dict(plan.mesh.shape)} over {plan.mesh.size} device(s), "
               f"ZeRO stage {plan.config.zero_stage}")

    metrics = MetricsWriter(run_dir / "metrics.jsonl")
    run_start = time.perf_counter()  # wall_seconds and train_seconds count the step compiles too
    train_step, eval_step = compile_steps(model, optimizer, plan, abstract, label_smoothing=config.label_smoothing)
    train_step = ShapeCompileTracker(train_step, signature=lambda s, b: b["src"].shape)
    if config.compile_ahead:  # every bucket's step program, compiled in parallel before the first step
        train_step.precompile([(abstract, batch_spec(plan, shape)) for shape in data.train.batch_shapes])
        tqdm.write(f"compiled {len(train_step)} step programs in {train_step.precompile_seconds:.1f} s "
                   f"(in parallel; each: {', '.join(f'{v:.1f}' for v in train_step.compile_seconds.values())} s)")
    translator = make_translator(config, model, data.tokenizer)

    def replicated(params):  # beam search runs replicated: each device decodes the same batch
        return jax.device_put(params, plan.replicated)

    def save(step: int, scores: dict | None = None, force: bool = False):
        checkpointer.save(step, state, {"data": data.train.state(), "config": config_to_dict(config)},
                          scores, force=force)

    def scores_of(params) -> dict[str, float]:
        scores = evaluate(eval_step, params, data.valid_batches(), plan)
        if config.eval.bleu:
            decoding = replicated(params)
            scores["bleu"] = translator.bleu(decoding, data.valid_pairs, max_sentences=config.eval.max_sentences)
            if data.test_pairs:
                scores["test_bleu"] = translator.bleu(decoding, data.test_pairs, max_sentences=config.eval.max_sentences)
        return scores

    window: collections.deque = collections.deque(maxlen=config.eval.average_last)  # (step, params)
    avg_metric = f"avg_{best_metric}"
    # meta.json of the best averaged params so far; on a resume, those of the earlier parts of the run
    best_average = read_averaged(run_dir) if int(state.step) else None

    def run_eval(step: int) -> dict[str, float]:
        nonlocal best_average
        scores = scores_of(state.params)
        if config.eval.average_last > 1:
            window.append((step, jax.tree.map(jnp.copy, state.params)))  # the train step donates state.params
            averaged = average_params([params for _, params in window])
            scores.update({f"avg_{k}": v for k, v in scores_of(averaged).items()})
            value, best = scores[avg_metric], (best_average or {}).get("scores", {}).get(avg_metric)
            if best is None or (value > best if best_mode == "max" else value < best):
                best_average = {"step": step, "averaged_steps": [s for s, _ in window], "metric": avg_metric,
                                "scores": scores}
                save_averaged(run_dir, averaged, best_average)
        metrics.write(step, "eval", train_seconds=train_seconds, wall_seconds=time.perf_counter() - run_start,
                      **scores)
        tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
        return scores

    start_step = int(state.step)
    end_step = config.steps if max_steps_this_run is None else min(config.steps, start_step + max_steps_this_run)
    window_tokens, window_start = 0, time.perf_counter()
    train_seconds = train_step.precompile_seconds  # steps incl. their compilation; no eval/saving
    last_scores: dict[str, float] = {}
    loss_guard = LossGuard()
    with checkpointer, _StopRequest() as stop, tqdm(total=config.steps, initial=start_step, desc="train",
                                                    dynamic_ncols=True) as bar:
        step = start_step
        while step < end_step and not stop.requested:
            step_start = time.perf_counter()
            host_batch = next(data.train)
            window_tokens += int(np.count_nonzero(host_batch["tgt_out"]))
            state, out = train_step(state, shard_batch(plan, host_batch))
            step += 1
            if step % config.log_every == 0 or step % config.eval.every == 0 or step == end_step:
                jax.block_until_ready(state.step)
            train_seconds += time.perf_counter() - step_start
            bar.update(1)
            loss_guard.push(step, out["loss"])
            if step % config.log_every == 0 or step == end_step:
                loss_guard.flush()
                out = jax.device_get(out)
                elapsed = time.perf_counter() - window_start
                lr = float(schedule(step - 1))
                record = {"loss": out["loss"], "loss_scale": out["loss_scale"], "lr": lr,
                          "target_tokens_per_s": window_tokens / elapsed,
                          "skipped_steps": int(out["skipped_steps"]), "programs": len(train_step)}
                metrics.write(step, "train", **record)
                bar.set_postfix(loss=f"{out['loss']:.3f}", tok_s=f"{window_tokens / elapsed:.0f}",
                                scale=f"{out['loss_scale']:.0f}", lr=f"{lr:.2e}")
                window_tokens, window_start = 0, time.perf_counter()
            if step % config.eval.every == 0 or step == config.steps:
                loss_guard.flush()
                last_scores = run_eval(step)
                save(step, last_scores)
            elif step % config.checkpoint.every == 0:
                loss_guard.flush()
                save(step)
        loss_guard.flush()
        if stop.requested or step < config.steps:
            save(step, force=True)
    sources = [src for src, _ in data.valid_pairs[:3]]
    for src, hyp in zip(sources, translator.translate(replicated(state.params), sources)):
        tqdm.write(f"translate: {src}\n       ->  {hyp}")
    summary = {
        "steps": step,
        "train_seconds": round(train_seconds, 2),
        "mesh": {"name": plan.config.name, "axes": dict(plan.mesh.shape), "zero_stage": plan.config.zero_stage},
        "compiled_step_shapes": {str(k): round(v, 2) for k, v in train_step.compile_seconds.items()},
        "step_compile_wall_seconds": round(train_step.precompile_seconds, 2),
        "num_step_programs": len(train_step),
        "bucket_ladder": list(config.data.buckets),
        "compilation_cache": cache_dir,
        "last_eval": last_scores,
        "best_step": checkpointer.best_step(),
        "data": data.stats,
    }
    if best_average is not None:
        summary["averaged_best_step"] = best_average["step"]
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    metrics.write(step, "summary", **{k: v for k, v in summary.items() if k != "data"})
    metrics.close()
    return summary


def _best_metric(config: TrainConfig) -> tuple[str, str]:
    """The validation metric that picks the best checkpoint, and ``"max"``/``"min"`` (which is better)."""
    return ("bleu", "max") if config.eval.bleu and config.eval.select_by == "bleu" else ("valid_nll", "min")
