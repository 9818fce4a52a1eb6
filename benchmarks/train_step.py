"""Full training step: lsjax (fused ops, 16-bit params) vs plain Flax + ``optax.adamw`` (fp32 master).

    python -m benchmarks.train_step [--models transformer-base,transformer-big] [--dtypes bfloat16,float16]
                                    [--out results.json] [--compilation-cache DIR]
    python -m benchmarks.train_step --smoke --out /tmp/t.json      # transformer-tiny, tiny batch, CPU (cpu_ffi)

For each model and compute dtype, two variants, each in a fresh subprocess (so the
device's ``peak_bytes_in_use`` is per variant and an OOM or crash only fails its row):

* ``lsjax``: what ``lsjax-train`` runs: ``lsjax.training.loop.build_model`` /
  ``build_optimizer`` / ``init_state`` and ``lsjax.training.step.make_train_step``,
  jitted with the state donated: params in the compute dtype, fused ops (backend
  ``cuda`` on a GPU), ``lsjax.optim.adamw`` with float32 moments, fused cross-entropy,
  dynamic loss scaling for float16.
* ``plain``: ``benchmarks.flax_reference.RefTransformer`` (``nn.MultiHeadDotProductAttention``
  etc.) with ``dtype=<compute dtype>, param_dtype=float32``, the optax loss
  (``softmax_cross_entropy`` of float32 logits against ``smooth_labels``), ``optax.adamw``
  with the same hyper-parameters and schedule. Loss scaling the jmp way (scale the loss,
  unscale, skip non-finite steps, adjust) through ``lsjax.optim.loss_scaled`` (pure jnp),
  the same scale settings as lsjax: dynamic for float16, none (but the skip check) for bfloat16.

Both: AdamW with lsjax-train's defaults (peak lr 1e-3, inverse-sqrt schedule with 2000
warm-up steps, b1 0.9, b2 0.98, eps 1e-8) and weight decay 0.01; no gradient clipping;
dropout at the model config's rates, label smoothing 0.1, the same fresh random
token batches (``batch`` sentences, ``src_len``/``tgt_len`` positions, lengths drawn from
[len/2, len], pad id 0), the model config's vocabulary (32000 for base/big).

Reported per row: step ms, the median over the timed steps, each step timed on its own
with ``jax.block_until_ready`` after warm-up (``dispatch_ms``: the median time until the step
call returns, i.e. the host's share of it); target tokens/s = mean non-pad ``tgt_out``
tokens per timed step / median step time; pipelined ms, the same steps dispatched back to
back as a training loop runs them (lsjax-train blocks only to log), the median over windows of
5 steps of window time / 5, and the speedup on it (``speedup_pipelined``); compile seconds of ``jit(...).lower(...).compile()``
(cold unless ``--compilation-cache``; the step is compiled before the state exists); the
device's ``peak_bytes_in_use`` after the run (state, batches, the step's buffers) and XLA's
compiled estimate (arguments + outputs + temporaries - donated aliases);
bytes per parameter of params + grads + optimizer state (``lsjax.optim.state_bytes_per_param``
on the real state; grads take the params' dtypes); speedup = lsjax tokens/s / plain tokens/s;
skipped = steps skipped for non-finite grads (warm-up included). The JSON at ``--out`` is
rewritten after every variant, so a run cut short keeps its finished rows.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from benchmarks.flax_reference import RefTransformer
from benchmarks.profile import XLA_OPTIONS
from lsjax import ops, optim
from lsjax.data import BOS_ID, EOS_ID, PAD_ID
from lsjax.models import load_model_config
from lsjax.training.config import OptimizerConfig, TrainConfig
from lsjax.training.loop import COMPUTE_DTYPES, build_loss_scale, build_model, build_optimizer, init_state
from lsjax.training.metrics import enable_compilation_cache
from lsjax.training.step import make_train_step, token_loss

IMPLS = ("lsjax", "plain")
PRECISION = {jnp.dtype(v).name: k for k, v in COMPUTE_DTYPES.items()}  # "bfloat16" -> "bf16"
OPTIMIZER = OptimizerConfig(name="adamw", weight_decay=0.01)  # both sides; the rest: lsjax-train's defaults
_ROOT = Path(__file__).resolve().parents[1]  # the variant subprocesses run here
PIPELINE_WINDOW = 5  # steps per pipelined timing window
_ROW = "ROW "  # prefix of the result line a variant subprocess prints
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b")  # a traceback's last line


@dataclasses.dataclass(frozen=True)
class Variant:
    """One benchmarked training step (one subprocess)."""

    model: str
    dtype: str
    impl: str
    batch: int = 128
    src_len: int = 64
    tgt_len: int = 64
    steps: int = 20
    warmup: int = 3
    backend: str | None = None  # lsjax ops backend of the lsjax side (None: lsjax's default)
    compilation_cache: str | None = None
    platform: str | None = None  # JAX_PLATFORMS of the subprocess (None: JAX's default)
    lsjax_overrides: tuple[str, ...] = ()  # model (key=value) and optimizer (optimizer.key=value) overrides, lsjax side
    xla_options: str = "default"  # named XLA option set (benchmarks.profile.XLA_OPTIONS) of the step's jit


def make_batches(v: Variant, vocab: int, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n`` random right-padded ``src``/``tgt_in``/``tgt_out`` batches (BOS/EOS as in lsjax.data)."""
    rng = np.random.default_rng(seed)

    def lengths(max_len: int) -> np.ndarray:
        n_pos = rng.integers(max_len // 2, max_len + 1, size=v.batch)
        n_pos[0] = max_len  # every batch uses its full padded length
        return n_pos[:, None]

    def one() -> dict[str, np.ndarray]:
        src = rng.integers(4, vocab, size=(v.batch, v.src_len))
        src = np.where(np.arange(v.src_len) < lengths(v.src_len), src, PAD_ID)
        words = rng.integers(4, vocab, size=(v.batch, v.tgt_len))
        pos, n_pos = np.arange(v.tgt_len), lengths(v.tgt_len)
        tgt_in = np.concatenate([np.full((v.batch, 1), BOS_ID), words[:, :-1]], axis=1)
        tgt_out = np.where(pos == n_pos - 1, EOS_ID, words)
        pad = pos >= n_pos
        return {"src": src.astype(np.int32), "tgt_in": np.where(pad, PAD_ID, tgt_in).astype(np.int32),
                "tgt_out": np.where(pad, PAD_ID, tgt_out).astype(np.int32)}

    return [one() for _ in range(n)]


def optax_token_loss(model, params, batch, *, label_smoothing: float, deterministic: bool,
                     dropout_key: jax.Array | None = None, plan=None) -> tuple[jax.Array, jax.Array]:
    """:func:`lsjax.training.step.token_loss` written the standard Flax/optax way (float32 log-softmax);
    single device only (``plan`` must be None)."""
    rngs = None if deterministic else {"dropout": dropout_key}
    logits = model.apply({"params": params}, batch["src"], batch["tgt_in"], deterministic=deterministic,
                         rngs=rngs)
    targets = optax.smooth_labels(jax.nn.one_hot(batch["tgt_out"], logits.shape[-1]), label_smoothing)
    losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    mask = batch["tgt_out"] != PAD_ID
    return jnp.sum(losses * mask), jnp.sum(mask, dtype=jnp.int32)


def build_step(v: Variant, sample: dict[str, np.ndarray]):
    """``(train_step, init)`` of one variant: ``init()`` is the jitted initial ``TrainState``."""
    overrides = {k: yaml.safe_load(val) for k, _, val in (o.partition("=") for o in v.lsjax_overrides)}
    optimizer = dataclasses.replace(OPTIMIZER, **{k.removeprefix("optimizer."): overrides.pop(k)
                                                  for k in list(overrides) if k.startswith("optimizer.")})
    config = TrainConfig(model=v.model, precision=PRECISION[v.dtype], optimizer=optimizer, compilation_cache=None,
                         model_overrides=overrides)
    vocab = load_model_config(v.model).vocab_size
    if v.impl == "lsjax":
        model = build_model(config, vocab)
        optimizer, _ = build_optimizer(config)
        loss = token_loss
    else:
        model = RefTransformer(load_model_config(v.model, vocab_size=vocab, dtype=v.dtype, param_dtype=jnp.float32))
        o = config.optimizer
        adamw = optax.adamw(optim.inverse_sqrt_schedule(o.lr, o.warmup_steps), o.b1, o.b2, o.eps, o.weight_decay)
        optimizer = optim.loss_scaled(adamw, build_loss_scale(config))
        loss = optax_token_loss
    init = jax.jit(lambda: init_state(model, optimizer, sample, config.seed))
    return make_train_step(model, optimizer, label_smoothing=config.label_smoothing, token_loss_fn=loss), init


def _memory_analysis(compiled) -> dict[str, int | None]:
    mem = compiled.memory_analysis()
    if mem is None:
        return {"compiled_peak_bytes": None}
    sizes = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    return {"compiled_peak_bytes": sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"],
            **{f"compiled_{k}_bytes": b for k, b in sizes.items()}}


def measure(v: Variant) -> dict:
    """Compiles and times one variant in this process (under ``v.backend``); returns its result row.

    The plain side runs under the ``"xla"`` ops backend: its loss scaling's gradient check is then
    plain ``jnp`` too, so no lsjax kernel runs in the peer's step.
    """
    backend = "xla" if v.impl == "plain" else v.backend
    with ops.use_backend(backend) if backend else contextlib.nullcontext():
        return _measure(v)


def _measure(v: Variant) -> dict:
    if v.compilation_cache:
        enable_compilation_cache(v.compilation_cache)
    else:
        jax.config.update("jax_enable_compilation_cache", False)
    vocab = load_model_config(v.model).vocab_size
    host_batches = make_batches(v, vocab, v.warmup + v.steps)
    step_fn, init = build_step(v, host_batches[0])
    # Compile against abstract inputs first, so the GEMM autotuner's scratch buffers are not
    # counted on top of the state in the device's peak memory.
    t0 = time.perf_counter()
    step = jax.jit(step_fn, donate_argnums=0, compiler_options=XLA_OPTIONS[v.xla_options])
    lowered = step.lower(jax.eval_shape(init), jax.eval_shape(lambda: host_batches[0]))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    state, batches = init(), jax.device_put(host_batches)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    bytes_per_param = optim.state_bytes_per_param(state.params, state.params, state.opt_state)

    times, dispatch_times = [], []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        dispatched = time.perf_counter()
        jax.block_until_ready((state, metrics))
        if i >= v.warmup:
            times.append(time.perf_counter() - start)
            dispatch_times.append(dispatched - start)
    # Pipelined, as a training loop runs: the timed batches again, dispatched back to back in
    # windows of PIPELINE_WINDOW steps, blocking once per window (the host queues the next step
    # while the device runs this one).
    timed = batches[v.warmup:]
    window_times = []
    for w in range(0, len(timed) - PIPELINE_WINDOW + 1, PIPELINE_WINDOW):
        start = time.perf_counter()
        for batch in timed[w:w + PIPELINE_WINDOW]:
            state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        window_times.append((time.perf_counter() - start) / PIPELINE_WINDOW)
    tokens = sum(int(np.count_nonzero(b["tgt_out"])) for b in host_batches[v.warmup:])
    stats = jax.devices()[0].memory_stats() or {}
    metrics = jax.device_get(metrics)
    return {
        **dataclasses.asdict(v), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "lsjax_backend": ops.get_backend() if v.impl == "lsjax" else None, "vocab": vocab,
        "lsjax_overrides": list(v.lsjax_overrides) if v.impl == "lsjax" else [],
        "params_M": n_params / 1e6, "bytes_per_param": bytes_per_param,
        "param_dtype": jnp.dtype(jax.tree.leaves(state.params)[0].dtype).name,
        "tgt_tokens_per_step": tokens / v.steps, "tgt_tokens_per_s": tokens / v.steps / float(np.median(times)),
        "step_ms": 1e3 * float(np.median(times)), "step_ms_min": 1e3 * min(times),
        "dispatch_ms": 1e3 * float(np.median(dispatch_times)),
        "step_ms_pipelined": 1e3 * float(np.median(window_times)) if window_times else None,
        "tgt_tokens_per_s_pipelined": tokens / v.steps / float(np.median(window_times)) if window_times else None,
        "lower_s": t1 - t0, "compile_s": t2 - t0, "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
        **_memory_analysis(compiled),
        "final_loss": float(metrics["loss"]), "skipped_steps": int(metrics["skipped_steps"]),
        "loss_scale": float(metrics["loss_scale"]),
    }


def run_variant(v: Variant, timeout: float) -> dict:
    """:func:`measure` in a fresh Python process; a failure becomes the row's ``error``."""
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--variant", json.dumps(dataclasses.asdict(v))]
    env = {**os.environ, "JAX_PLATFORMS": v.platform} if v.platform else None
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=_ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {**dataclasses.asdict(v), "error": f"timed out after {timeout:.0f} s"}
    rows = [line[len(_ROW):] for line in proc.stdout.splitlines() if line.startswith(_ROW)]
    if proc.returncode != 0 or not rows:
        lines = proc.stderr.splitlines()
        errors = [line for line in lines if _EXCEPTION.match(line)] or lines[-1:] or ["no output"]
        return {**dataclasses.asdict(v), "error": f"exit {proc.returncode}: {errors[-1][:300]}",
                "stderr_tail": proc.stderr[-4000:]}
    return {**json.loads(rows[-1]), "wall_s": time.perf_counter() - start}


def add_speedups(rows: list[dict]) -> None:
    """Sets ``speedup`` (lsjax tokens/s / plain tokens/s) on each lsjax row with a plain twin."""
    plain = {(r["model"], r["dtype"]): r for r in rows if r["impl"] == "plain" and "error" not in r}
    for r in rows:
        twin = plain.get((r["model"], r["dtype"]))
        if r["impl"] == "lsjax" and "error" not in r and twin:
            r["speedup"] = r["tgt_tokens_per_s"] / twin["tgt_tokens_per_s"]
            if r.get("tgt_tokens_per_s_pipelined") and twin.get("tgt_tokens_per_s_pipelined"):
                r["speedup_pipelined"] = r["tgt_tokens_per_s_pipelined"] / twin["tgt_tokens_per_s_pipelined"]


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.0f}"


def table(rows: list[dict]) -> str:
    """Markdown table of the result rows."""
    lines = ["| model | dtype | impl | params M | tgt tok/s | step ms | dispatch ms | speedup | pipelined ms | speedup "
             "| peak MiB | compiled MiB | bytes/param | compile s | skipped |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        notes = [r["lsjax_backend"], *r.get("lsjax_overrides", [])] if r.get("lsjax_backend") else []
        notes += [f"xla: {r['xla_options']}"] if r.get("xla_options", "default") != "default" else []
        backend = f" ({', '.join(notes)})" if notes else ""
        head = f"| {r['model']} | {r['dtype']} | {r['impl']}{backend} |"
        if "error" in r:
            lines.append(f"{head} error: {r['error'].replace('|', '/')} |" + " |" * 11)
            continue
        speedup, piped = (f"{r[k]:.2f}x" if k in r else "" for k in ("speedup", "speedup_pipelined"))
        piped_ms = f"{r['step_ms_pipelined']:.2f}" if r.get("step_ms_pipelined") else "n/a"
        lines.append(f"{head} {r['params_M']:.1f} | {r['tgt_tokens_per_s']:,.0f} | {r['step_ms']:.2f} "
                     f"| {r['dispatch_ms']:.2f} | {speedup} "
                     f"| {piped_ms} | {piped} "
                     f"| {_mib(r['peak_bytes_in_use'])} | {_mib(r['compiled_peak_bytes'])} "
                     f"| {r['bytes_per_param']:.2f} | {r['compile_s']:.1f} | {r['skipped_steps']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="transformer-base,transformer-big")
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--out", default="", help="JSON results path (rewritten after every variant)")
    parser.add_argument("--batch", type=int, default=128, help="sentences per batch")
    parser.add_argument("--src-len", type=int, default=64)
    parser.add_argument("--tgt-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--backend", choices=ops.BACKENDS, default=None,
                        help="lsjax ops backend of the lsjax side (default: lsjax's, 'cuda' on a GPU)")
    parser.add_argument("--compilation-cache", default=None,
                        help="enable JAX's persistent compilation cache in DIR (default off: cold compiles)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per variant subprocess")
    parser.add_argument("--smoke", action="store_true",
                        help="transformer-tiny, tiny batch, few steps, on CPU (backend cpu_ffi unless --backend)")
    parser.add_argument("--lsjax-overrides", default="",
                        help="comma-separated model config key=value overrides of the lsjax side, e.g. "
                             "scan_layers=true (a scanned stack: ~15x fewer param/state arrays per call), "
                             "or of its optimizer as optimizer.key=value, e.g. optimizer.kernel=multi; "
                             "';' separates sets, one lsjax variant each, e.g. ';scan_layers=true'")
    parser.add_argument("--lsjax-xla-options", default="default",
                        help="comma-separated XLA option sets of benchmarks.profile.XLA_OPTIONS for the lsjax side, "
                             "one lsjax variant each (same-run comparison), e.g. default,nosplitk")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print its row
    args = parser.parse_args(argv)
    if args.variant:
        print(_ROW + json.dumps(measure(Variant(**json.loads(args.variant)))), flush=True)
        return
    if args.smoke:
        args.models, args.batch, args.src_len, args.tgt_len = "transformer-tiny", 8, 16, 16
        args.steps, args.warmup = 5, 1
        args.backend = args.backend or "cpu_ffi"
    # The parent never touches a device: a GPU client here would hold memory the variants need.
    print(f"train step, {args.batch} sentences x {args.src_len} src / {args.tgt_len} tgt positions, "
          f"{args.steps} timed steps after {args.warmup}; lsjax backend: {args.backend or 'default'}; "
          f"compilation cache: {args.compilation_cache or 'off'}", flush=True)
    override_sets = [tuple(o for o in group.split(",") if o) for group in args.lsjax_overrides.split(";")]
    lsjax_sides = [(o, x) for o in override_sets for x in args.lsjax_xla_options.split(",")]
    variants = [Variant(model, jnp.dtype(dtype).name, impl, args.batch, args.src_len, args.tgt_len, args.steps,
                        args.warmup, args.backend, args.compilation_cache, "cpu" if args.smoke else None,
                        overrides, xla_options)
                for model in args.models.split(",") for dtype in args.dtypes.split(",") for impl in IMPLS
                for overrides, xla_options in (lsjax_sides if impl == "lsjax" else [((), "default")])]
    rows, start = [], time.perf_counter()
    for v in variants:
        row = run_variant(v, args.timeout)
        rows.append(row)
        add_speedups(rows)
        print(f"[{time.perf_counter() - start:6.0f} s] " + table([row]).splitlines()[-1], flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"rows": rows}, f, indent=1)
    device = next((r["device"] for r in rows if "device" in r), "unknown")
    print(f"\ndevice: {device}; tokens/s counts non-pad target tokens; speedup = lsjax / plain tokens/s; "
          f"skipped: non-finite steps skipped of {args.warmup + args.steps}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
