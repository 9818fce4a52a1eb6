"""``lsjax-train --config configs/train/<name>.yaml [key=value ...]``: train a seq2seq Transformer.

Examples::

    lsjax-train --config tiny-synthetic
    lsjax-train --config multi30k --data-dir ../shared/data/multi30k precision=fp16 steps=3000

A run directory holds ``config.json``, ``metrics.jsonl`` (one JSON object per line), orbax
checkpoints and ``summary.json``. Running the same command again resumes from the latest
checkpoint; Ctrl-C saves a checkpoint and exits.
"""

from __future__ import annotations

import argparse
import json
import sys

from lsjax.training.config import load_train_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lsjax-train", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="name in configs/train/ or a YAML path")
    parser.add_argument("--data-dir", help="shorthand for data.data_dir=... (e.g. the Multi30k folder)")
    parser.add_argument("--run-dir", help="shorthand for run_dir=...")
    parser.add_argument("--mesh", help="shorthand for mesh=... (name in configs/mesh/ or a YAML path)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, values parsed as YAML")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    for flag, key in ((args.data_dir, "data.data_dir"), (args.run_dir, "run_dir"), (args.mesh, "mesh")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    config = load_train_config(args.config, overrides)
    from lsjax.training.loop import train  # imports jax/flax only after the config is valid

    summary = train(config)
    print(json.dumps({k: summary[k] for k in ("steps", "num_step_programs", "last_eval", "best_step")},
                     default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
