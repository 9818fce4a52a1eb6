"""Model configuration and YAML loading."""

from __future__ import annotations

import dataclasses
import os

import yaml

from lsjax.nn.config import LayerConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "configs", "model")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig(LayerConfig):
    """A :class:`lsjax.nn.LayerConfig` plus the model-level fields.

    Attributes:
      vocab_size: vocabulary size (usually set from the tokenizer).
      num_encoder_layers: 0 for a decoder-only LM.
      num_decoder_layers: decoder depth.
      share_all_embeddings: one table for source and target (and the output projection,
        which is always tied to the target embedding).
      max_positions: 0 for sinusoidal positions, else the rows of a learned table.
      label_smoothing: epsilon of the training loss.
    """

    vocab_size: int
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    share_all_embeddings: bool = True
    max_positions: int = 0
    label_smoothing: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        if self.max_positions and self.max_positions < self.max_seq_len:
            raise ValueError(f"max_positions={self.max_positions} must be >= max_seq_len={self.max_seq_len}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")


def load_model_config(name_or_path: str, **overrides) -> TransformerConfig:
    """Reads a :class:`TransformerConfig` from YAML.

    Args:
      name_or_path: a name in ``configs/model`` (``"transformer-base"``) or a YAML path.
      overrides: field values that replace the file's (e.g. ``vocab_size=`` from the
        tokenizer, ``dtype="bfloat16"``).
    """
    path = name_or_path
    if not os.path.exists(path):
        path = os.path.join(CONFIG_DIR, f"{name_or_path}.yaml")
        if not os.path.exists(path):
            known = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
            raise FileNotFoundError(f"no model config {name_or_path!r}: not a file, and not one of {known}")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    values.update(overrides)
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{path}: unknown model config fields {unknown}; known: {sorted(fields)}")
    return TransformerConfig(**values)
