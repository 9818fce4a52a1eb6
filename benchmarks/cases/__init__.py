"""One module per op; each defines ``cases() -> list[harness.Case]``."""
