"""``python -m lsjax`` / ``lsjax-info``: what this build and machine can run."""

from __future__ import annotations

import jax

from lsjax import ops


def main() -> None:
    targets = ops.registered_targets()
    print(f"jax {jax.__version__}, default device: {jax.devices()[0]}")
    print(f"backends available: {', '.join(ops.available_backends())}; default: {ops.default_backend()}")
    for platform, names in targets.items():
        print(f"{platform} targets ({len(names)}): {', '.join(names) if names else '(none built)'}")
    for name in ops.BACKENDS:
        reason = ops.backend.unavailable_reason(name)
        if reason:
            print(f"  {name}: unavailable - {reason}")


if __name__ == "__main__":
    main()
