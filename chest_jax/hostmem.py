"""Host memory for XLA:CPU: ask glibc's malloc for transparent huge pages, by re-executing the script once.

Why: XLA:CPU allocates the large arrays of every step afresh (activations, gradients, the attention weights of the
default model: 32 x 8 x 256 x 256 float32 = 67 MB each). Blocks that large are beyond glibc's mmap threshold (at
most 32 MiB), so each is a fresh mapping that the kernel fills page by page on first touch and unmaps on free. With
4 KiB pages a full-config training step took 575k page faults and about 1 s of kernel time out of 3.5 s, and a
67 MB elementwise op spent 26 of its 36 ms faulting (measured on the project's 2-core CPU machine). glibc's
`glibc.malloc.hugetlb=1` tunable makes malloc advise its mappings for transparent huge pages (2 MiB: 512x fewer
faults); the same op then took 12 ms, and the full-config train step went from 16.2 to 23.0 samples/s on a
quiet machine (`CHEST_JAX_HUGE_PAGES=0 python benchmarks/train_throughput.py --run-steps 0` against the same
without). glibc reads tunables only when the process starts, so every entry-point script (the three at the top
level and the benchmarks) calls `use_huge_pages()` first thing, which re-executes the same command line
once with the tunable added to GLIBC_TUNABLES. Nothing changes numerically: only where arrays live.

It does nothing (and never re-executes) when: not Linux with glibc >= 2.35 (the first with the tunable), the kernel
offers no transparent huge pages to madvise (`/sys/kernel/mm/transparent_hugepage/enabled` is `[never]` or absent),
GLIBC_TUNABLES already names `glibc.malloc.hugetlb` (the re-executed process, or a user's own choice), or
CHEST_JAX_HUGE_PAGES=0.
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "CHEST_JAX_HUGE_PAGES"
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _glibc_supports_tunable() -> bool:
    name, version = platform.libc_ver()
    if name != "glibc":
        return False
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 35)


def thp_mode(mode_file: Path = THP_MODE_FILE) -> str | None:
    """The kernel's transparent-huge-page mode (the bracketed word: always, madvise or never), None if unknown."""
    try:
        text = mode_file.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def tuned_environment(environ: Mapping[str, str], *, platform_ok: bool | None = None) -> dict[str, str] | None:
    """The environment to re-execute with (GLIBC_TUNABLES extended by glibc.malloc.hugetlb=1), or None when nothing
    should change (see the module docstring for when)."""
    if environ.get(OPT_OUT, "1") == "0":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables:
        return None
    if platform_ok is None:
        platform_ok = sys.platform == "linux" and _glibc_supports_tunable() and thp_mode() in ("always", "madvise")
    if not platform_ok:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
    return env


def without_huge_pages(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` as a program that knows nothing of this module would run in: the huge-page tunable taken out of
    GLIBC_TUNABLES (the variable dropped when nothing else is in it) and the opt-out set, so that a benchmark can
    time a reference (the PyTorch original) the way its users run it."""
    env = dict(environ)
    kept = [t for t in env.pop("GLIBC_TUNABLES", "").split(":") if t and not t.startswith(TUNABLE + "=")]
    if kept:
        env["GLIBC_TUNABLES"] = ":".join(kept)
    env[OPT_OUT] = "0"
    return env


def use_huge_pages() -> None:
    """Re-execute this script with huge-page malloc, unless it already has it or cannot (module docstring).

    Call it first thing under `if __name__ == "__main__":` of an entry-point script, before anything is written or
    any thread is started: the process is replaced. Never call it from library code or under pytest."""
    env = tuned_environment(os.environ)
    if env is None:
        return
    # sys.orig_argv keeps the interpreter's own options (-X, -m module, -c) as the user gave them.
    argv = [sys.executable, *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
