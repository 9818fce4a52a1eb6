"""The training loop behind ``lsjax-train``: data, model, optimizer, checkpoints, eval, metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from lsjax import data as lsdata
from lsjax import ops, optim
from lsjax.models import Transformer, load_model_config
from lsjax.training.checkpoint import Checkpointer
from lsjax.training.config import TrainConfig, config_from_dict, config_to_dict
from lsjax.training.data import RunData, prepare_data
from lsjax.training.metrics import LossGuard, MetricsWriter, ShapeCompileTracker, enable_compilation_cache
from lsjax.training.step import TrainState, make_eval_step, make_train_step
from lsjax.translate import Translator

PARAM_DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}


def build_model(config: TrainConfig, vocab_size: int) -> Transformer:
    dtype = PARAM_DTYPES[config.precision]
    model_config = load_model_config(config.model, vocab_size=vocab_size, dtype=dtype, param_dtype=dtype,
                                     **config.model_overrides)
    return Transformer(model_config)


def make_translator(config: TrainConfig, model, tokenizer) -> Translator:
    e = config.eval
    return Translator(model, tokenizer, config.data.buckets, batch_size=e.batch_size, beam_size=e.beam_size,
                      length_penalty=e.length_penalty)


def load_for_inference(run_dir: str | Path, step: int | None = None):
    """``(model, params, tokenizer, buckets)`` from a run directory (best checkpoint by default)."""
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
    abstract = jax.eval_shape(lambda: init_state(model, optimizer, sample, config.seed))
    best_metric, best_mode = _best_metric(config)
    checkpointer = Checkpointer(run_dir / "checkpoints", best_metric=best_metric, best_mode=best_mode)
    step = step if step is not None else checkpointer.best_step() or checkpointer.latest_step()
    state, _ = checkpointer.restore(abstract, step)
    checkpointer.close()
    return model, state.params, tokenizer, config.data.buckets


def build_optimizer(config: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``loss_scaled(chain([clip], adam|adamw|lion))`` with an inverse-sqrt warmup schedule;
    dynamic loss scaling for fp16, none (but still skip-on-inf/NaN) otherwise."""
    o = config.optimizer
    schedule = optim.inverse_sqrt_schedule(o.lr, o.warmup_steps)
    common = {"moment_dtype": jnp.dtype(o.moment_dtype), "rounding": o.rounding, "seed": config.seed}
    if o.name == "adamw":
        inner = optim.adamw(schedule, o.b1, o.b2, o.eps, o.weight_decay, **common)
    elif o.name == "adam":
        inner = optim.adam(schedule, o.b1, o.b2, o.eps, **common)
    elif o.name == "lion":
        inner = optim.lion(schedule, o.b1, o.b2, o.weight_decay, **common)
    else:
        raise ValueError(f"optimizer.name must be 'adam', 'adamw' or 'lion', got {o.name!r}")
    if o.clip_norm > 0:
        inner = optax.chain(optax.clip_by_global_norm(o.clip_norm), inner)
    s = config.loss_scale
    scale = (optim.DynamicLossScale.create(s.initial, period=s.growth_interval, factor=s.factor,
                                           min_loss_scale=s.min_scale, max_loss_scale=s.max_scale)
             if config.precision == "fp16" else optim.NoOpLossScale())
    return optim.loss_scaled(inner, scale), schedule


def init_state(model, optimizer, sample_batch: dict, seed: int) -> TrainState:
    init_key, train_key = jax.random.split(jax.random.key(seed))
    variables = model.init(init_key, jnp.asarray(sample_batch["src"][:1]), jnp.asarray(sample_batch["tgt_in"][:1]))
    params = nn.unbox(variables["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(train_key))


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


def evaluate(eval_step, params, batches: Iterator[dict]) -> dict[str, float]:
    """Token-level validation NLL and perplexity over all batches."""
    nll, tokens = 0.0, 0
    for batch in batches:
        out = eval_step(params, {k: jnp.asarray(v) for k, v in batch.items()})
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
    cache_dir = enable_compilation_cache(config.compilation_cache)
    backend = ops.use_backend(config.backend) if config.backend else contextlib.nullcontext()
    with backend:
        return _train(config, run_dir, cache_dir, max_steps_this_run)


def _train(config: TrainConfig, run_dir: Path, cache_dir: str | None, max_steps_this_run: int | None):
    data: RunData = prepare_data(config.data, run_dir, seed=config.seed)
    model = build_model(config, data.tokenizer.vocab_size)
    optimizer, schedule = build_optimizer(config)
    state = init_state(model, optimizer, data.sample_batch(), config.seed)
    best_metric, best_mode = _best_metric(config)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=config.checkpoint.keep,
                                keep_best=config.checkpoint.keep_best, best_metric=best_metric, best_mode=best_mode)
    if checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(state)
        data.train.restore(meta["data"])
        tqdm.write(f"resumed from step {int(state.step)} in {checkpointer.manager.directory}")
    # jit lowers uncommitted (fresh) and committed (restored) arrays differently: commit both alike
    # so that a resumed run reuses the programs of a fresh one from the persistent cache.
    state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, state))

    metrics = MetricsWriter(run_dir / "metrics.jsonl")
    train_step = ShapeCompileTracker(jax.jit(make_train_step(model, optimizer, label_smoothing=config.label_smoothing),
                                             donate_argnums=0), signature=lambda s, b: b["src"].shape)
    eval_step = jax.jit(make_eval_step(model))
    translator = make_translator(config, model, data.tokenizer)

    def save(step: int, scores: dict | None = None, force: bool = False):
        checkpointer.save(step, state, {"data": data.train.state(), "config": config_to_dict(config)},
                          scores, force=force)

    def run_eval(step: int) -> dict[str, float]:
        scores = evaluate(eval_step, state.params, data.valid_batches())
        if config.eval.bleu:
            scores["bleu"] = translator.bleu(state.params, data.valid_pairs, max_sentences=config.eval.max_sentences)
        metrics.write(step, "eval", **scores)
        tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
        return scores

    start_step = int(state.step)
    end_step = config.steps if max_steps_this_run is None else min(config.steps, start_step + max_steps_this_run)
    window_tokens, window_start = 0, time.perf_counter()
    last_scores: dict[str, float] = {}
    loss_guard = LossGuard()
    with checkpointer, _StopRequest() as stop, tqdm(total=config.steps, initial=start_step, desc="train",
                                                    dynamic_ncols=True) as bar:
        step = start_step
        while step < end_step and not stop.requested:
            host_batch = next(data.train)
            window_tokens += int(np.count_nonzero(host_batch["tgt_out"]))
            state, out = train_step(state, {k: jnp.asarray(v) for k, v in host_batch.items()})
            step += 1
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
    for src, hyp in zip(sources, translator.translate(state.params, sources)):
        tqdm.write(f"translate: {src}\n       ->  {hyp}")
    summary = {
        "steps": step,
        "compiled_step_shapes": {str(k): round(v, 2) for k, v in train_step.compile_seconds.items()},
        "num_step_programs": len(train_step),
        "bucket_ladder": list(config.data.buckets),
        "compilation_cache": cache_dir,
        "last_eval": last_scores,
        "best_step": checkpointer.best_step(),
        "data": data.stats,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    metrics.write(step, "summary", **{k: v for k, v in summary.items() if k != "data"})
    metrics.close()
    return summary


def _best_metric(config: TrainConfig) -> tuple[str, str]:
    """The validation metric that picks the best checkpoint, and ``"max"``/``"min"`` (which is better)."""
    return ("bleu", "max") if config.eval.bleu and config.eval.select_by == "bleu" else ("valid_nll", "min")
