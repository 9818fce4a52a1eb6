"""Static SASS instruction counts of lsjax's CUDA kernels (needs ``cuobjdump`` of the CUDA toolkit).

    python -m benchmarks.sass_count [REGEX] [--top 14] [--dump kernels.sass]

Disassembles the built extension (``lsjax/_ffi*.so``), and for every kernel whose demangled
name matches REGEX prints its instruction count and most frequent opcodes (``IMAD.WIDE.U32``,
``LOP3.LUT``, ``MUFU.EX2``, ...): a per-instruction view of what a change to, e.g., the Philox
rounds or the mask handling costs, without a profiler. ``--dump`` also writes those kernels' SASS.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess

_FUNCTION = re.compile(r"^\s*Function : (\S+)")
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def _tool(name: str) -> str:
    found = shutil.which(name) or next(iter(glob.glob(f"/usr/local/cuda*/bin/{name}")), None)
    if not found:
        raise SystemExit(f"{name} not found on PATH or under /usr/local/cuda*/bin: install the CUDA toolkit's binutils")
    return found


def kernels(so_path: str) -> dict[str, list[str]]:
    """Mangled kernel name -> its SASS instruction opcodes, in order (every cubin of the file)."""
    return parse_sass(subprocess.run([_tool("cuobjdump"), "-sass", so_path], capture_output=True, text=True,
                                     check=True).stdout)


def parse_sass(sass: str) -> dict[str, list[str]]:
    """``cuobjdump -sass`` text -> {mangled kernel name: opcodes in order} (predicates dropped)."""
    out: dict[str, list[str]] = {}
    current = None
    for line in sass.splitlines():
        if m := _FUNCTION.match(line):
            current = out.setdefault(m.group(1), [])
        elif current is not None and (m := _INSTRUCTION.search(line)):
            current.append(m.group(1))
    return out


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("cu++filt") or shutil.which("c++filt")
    if not filt:
        return {n: n for n in names}
    text = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, text.splitlines(), strict=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("regex", nargs="?", default=".", help="over the demangled kernel names")
    parser.add_argument("--so", default="", help="the extension (default: lsjax/_ffi*.so)")
    parser.add_argument("--top", type=int, default=14, help="opcodes listed per kernel")
    parser.add_argument("--dump", default="", help="also write the matching kernels' SASS here")
    args = parser.parse_args(argv)
    so = args.so or next(iter(sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "lsjax", "_ffi*.so")))),
                         "")
    if not so:
        raise SystemExit("no lsjax/_ffi*.so: build the extension first (pip install -e .)")
    found = kernels(so)
    names = demangle(sorted(found))
    pattern = re.compile(args.regex)
    chosen = [(names[k], k) for k in sorted(found) if pattern.search(names[k])]
    for name, mangled in chosen:
        ops = found[mangled]
        top = collections.Counter(ops).most_common(args.top)
        print(f"{len(ops):6d}  {name[:160]}\n        " + "  ".join(f"{op} {n}" for op, n in top))
    if args.dump:
        wanted = {m for _, m in chosen}
        sass = subprocess.run([_tool("cuobjdump"), "-sass", so], capture_output=True, text=True, check=True).stdout
        keep, lines = False, []
        for line in sass.splitlines():
            if m := _FUNCTION.match(line):
                keep = m.group(1) in wanted
            if keep:
                lines.append(line)
        with open(args.dump, "w") as f:
            f.write("\n".join(lines))
    print(f"{len(chosen)} of {len(found)} kernels matched {args.regex!r}")


if __name__ == "__main__":
    main()
