"""Training configuration: YAML files in ``configs/train/`` plus ``key.sub=value`` overrides.

Every section is a frozen dataclass; unknown keys are errors (a typo in a config
must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from lsjax.data.batching import OVERLONG_POLICIES

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the parallel text comes from and how it is bucketed.

    ``kind``: ``"synthetic"`` (built-in toy task written under the run dir),
    ``"multi30k"`` (``data_dir`` holds Multi30k En-De) or ``"files"``
    (``train_src``/``train_tgt``/``valid_src``/``valid_tgt`` paths, plain or .gz).
    """

    kind: str = "synthetic"
    data_dir: str | None = None
    train_src: str | None = None
    train_tgt: str | None = None
    valid_src: str | None = None
    valid_tgt: str | None = None
    test_src: str | None = None
    test_tgt: str | None = None
    synthetic_pairs: int = 4000
    vocab_size: int = 8000
    tokenizer: str | None = None
    buckets: tuple[int, ...] = (8, 16, 32, 64)
    max_batch_tokens: int = 4096
    overlong: str = "drop"
    shuffle_seed: int = 0

    def __post_init__(self):
        if self.kind not in ("synthetic", "multi30k", "files"):
            raise ValueError(f"data.kind must be 'synthetic', 'multi30k' or 'files', got {self.kind!r}")
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"data.overlong must be one of {OVERLONG_POLICIES}, got {self.overlong!r}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """lsjax.optim settings; ``lr`` is the peak of an inverse-sqrt schedule with linear warmup.
    ``kernel``: adam/adamw's update path (``lsjax.optim.adamw``: ``"xla"`` or ``"multi"``); ``"auto"``
    takes ``"multi"`` (one in-place kernel for every leaf) for lsjax adam/adamw with float32
    moments, nearest rounding and no clipping, else ``"xla"``."""

    name: str = "adamw"
    lr: float = 1e-3
    warmup_steps: int = 2000
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 0.0
    moment_dtype: str = "float32"
    rounding: str = "nearest"
    kernel: str = "auto"


@dataclasses.dataclass(frozen=True)
class LossScaleConfig:
    """Dynamic loss scaling (used only when ``precision == "fp16"``)."""

    initial: float = 2.0**15
    growth_interval: int = 2000
    factor: float = 2.0
    min_scale: float = 1.0
    max_scale: float = 2.0**24


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Periodic validation: loss on the whole validation set and sacreBLEU of decoded text.

    ``select_by`` picks the best checkpoint: ``"bleu"`` (higher is better; falls back to
    ``"valid_nll"`` when ``bleu`` is off) or ``"valid_nll"`` (lower is better).

    ``average_last`` > 1 also evaluates the element-wise mean of the params of the last
    ``average_last`` evaluations, this one included (fairseq's checkpoint averaging, computed
    in float32 and rounded once to the params' dtype), reported with an ``avg_`` prefix
    (``avg_valid_nll``, ``avg_bleu``, ``avg_test_bleu``); the window holds device copies of
    those params and starts again after a resume. The averaged params that score best on the
    ``select_by`` metric so far (a resumed run included) are saved to ``<run_dir>/averaged/``
    (orbax ``params/`` and ``meta.json``: step, averaged steps, scores), loadable with
    ``load_for_inference(run_dir, averaged=True)`` and ``lsjax-translate --averaged``.
    """

    every: int = 500
    bleu: bool = True
    beam_size: int = 4
    length_penalty: float = 0.6
    max_sentences: int | None = None
    batch_size: int = 128
    select_by: str = "bleu"
    average_last: int = 1

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"eval.every must be >= 1, got {self.every}")
        if self.average_last < 1:
            raise ValueError(f"eval.average_last must be >= 1 (1: no averaging), got {self.average_last}")
        if self.select_by not in ("bleu", "valid_nll"):
            raise ValueError(f"eval.select_by must be 'bleu' or 'valid_nll', got {self.select_by!r}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500
    keep: int = 2
    keep_best: int = 1

    def __post_init__(self):
        if self.every < 1 or self.keep < 1 or self.keep_best < 0:
            raise ValueError(f"checkpoint needs every >= 1, keep >= 1 and keep_best >= 0, got {self}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run.

    ``precision``: ``"bf16"``/``"fp16"``/``"fp32"``, the compute dtype and, by default, the only
    copy of the params (lsjax optimizer, no fp32 master). ``master_weights=True`` is the standard
    mixed-precision recipe used as the baseline: fp32 params, compute in ``precision``, plain
    ``optax`` optimizer (adam/adamw/lion) on the fp32 params. ``compile_ahead``: compile the step
    program of every bucket that has data before the first step, in parallel threads (else each
    compiles when its bucket first comes up).
    """

    model: str = "transformer-tiny"
    model_overrides: dict = dataclasses.field(default_factory=dict)
    data: DataConfig = DataConfig()
    precision: str = "bf16"
    master_weights: bool = False
    optimizer: OptimizerConfig = OptimizerConfig()
    loss_scale: LossScaleConfig = LossScaleConfig()
    label_smoothing: float = 0.1
    steps: int = 1000
    seed: int = 0
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    run_dir: str = "runs/default"
    log_every: int = 50
    mesh: str = "single"
    compilation_cache: str | None = "~/.cache/lsjax/jax_compilation_cache"
    compile_ahead: bool = True
    backend: str | None = None

    def __post_init__(self):
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be 'bf16', 'fp16' or 'fp32', got {self.precision!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")


def _build(cls, values: dict[str, Any], where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where or 'train config'}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"{where}{name} must be a mapping, got {value!r}")
            value = _build(hint, value, f"{where}{name}.")
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
        if not isinstance(tree, dict):
            raise ValueError(f"override {dotted!r}: {p!r} is not a section")
    tree[leaf] = value


def resolve_config_path(name_or_path: str, kind: str) -> Path:
    """``configs/<kind>/<name>.yaml`` for a bare name, else the path itself."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise FileNotFoundError(f"{kind} config {path} does not exist")
        return path
    candidate = CONFIG_ROOT / kind / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(p.stem for p in (CONFIG_ROOT / kind).glob("*.yaml"))
        raise FileNotFoundError(f"no {kind} config named {name_or_path!r}; known: {known}")
    return candidate


def load_train_config(name_or_path: str, overrides: Sequence[str] = ()) -> TrainConfig:
    """Reads a train YAML and applies ``section.key=value`` overrides (values parsed as YAML)."""
    raw = yaml.safe_load(resolve_config_path(name_or_path, "train").read_text()) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value (e.g. steps=200, optimizer.lr=5e-4)")
        _set_dotted(raw, key.strip(), yaml.safe_load(value))
    return _build(TrainConfig, raw, "")


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Inverse of :func:`config_to_dict` (e.g. a run directory's ``config.json``)."""
    return _build(TrainConfig, values, "")
