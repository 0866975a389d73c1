"""chest_jax.hostmem: when the entry scripts re-execute with huge-page malloc, that they do it once with the command
line intact, and that the tunable does what it is there for (fewer page faults on large fresh arrays)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chest_jax import hostmem

REPO = Path(__file__).resolve().parents[1]
ACTIVE = hostmem.tuned_environment({"PATH": "x"}) is not None  # this machine: Linux, glibc >= 2.35, THP offered


def test_tuned_environment_adds_the_tunable_once_and_keeps_the_users_own():
    env = hostmem.tuned_environment({"PATH": "/bin"}, platform_ok=True)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = hostmem.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, platform_ok=True)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    # already there (the re-executed process, or the user's own setting, even =0): nothing to do
    assert hostmem.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, platform_ok=True) is None
    assert hostmem.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, platform_ok=True) is None
    assert hostmem.tuned_environment({"CHEST_JAX_HUGE_PAGES": "0"}, platform_ok=True) is None
    assert hostmem.tuned_environment({}, platform_ok=False) is None


def test_without_huge_pages_takes_out_only_the_tunable():
    tuned = hostmem.tuned_environment({"PATH": "/bin"}, platform_ok=True)
    assert hostmem.without_huge_pages(tuned) == {"PATH": "/bin", "CHEST_JAX_HUGE_PAGES": "0"}
    env = hostmem.without_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
    # and the result is never re-tuned by an entry script
    assert hostmem.tuned_environment(env, platform_ok=True) is None


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hostmem.thp_mode(f) == "madvise"
    f.write_text("always madvise [never]\n")
    assert hostmem.thp_mode(f) == "never"
    assert hostmem.thp_mode(tmp_path / "absent") is None


def _run(code: str, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.OPT_OUT)}
    env.update(env_extra or {})
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120,
                          check=True)


SCRIPT = textwrap.dedent("""
    import os, sys
    print("started", flush=True)
    from chest_jax.hostmem import use_huge_pages
    use_huge_pages()
    print("tunables", os.environ.get("GLIBC_TUNABLES"), "args", sys.argv[1:])
""")


@pytest.mark.skipif(not ACTIVE, reason="huge-page malloc does not apply on this machine (no glibc >= 2.35 or no THP)")
def test_a_script_re_executes_once_with_its_arguments():
    out = _run(SCRIPT, "--config", "a b.yaml", "x=1").stdout.splitlines()
    # the first start ran until use_huge_pages; the re-executed one to the end, with the tunable and the same args
    assert out == ["started", "started", "tunables glibc.malloc.hugetlb=1 args ['--config', 'a b.yaml', 'x=1']"]


def test_opting_out_runs_once_unchanged():
    out = _run(SCRIPT, "x=1", env_extra={hostmem.OPT_OUT: "0"}).stdout.splitlines()
    assert out == ["started", "tunables None args ['x=1']"]


FAULTS = textwrap.dedent("""
    import resource
    import numpy as np
    np._core.multiarray._set_madvise_hugepage(False)  # numpy advises its own arrays; measure malloc's choice alone
    a = np.ones(1 << 24, np.float32)  # 64 MiB: beyond glibc's mmap threshold, like XLA's large arrays
    faults = []
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        b = a * 2.0  # a fresh 64 MiB block, touched once, freed at the next assignment
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        del b
    print(min(faults))
""")


@pytest.mark.skipif(not ACTIVE, reason="huge-page malloc does not apply on this machine (no glibc >= 2.35 or no THP)")
def test_huge_page_malloc_cuts_the_page_faults_of_large_fresh_arrays():
    plain = int(_run(FAULTS).stdout)
    huge = int(_run(FAULTS, env_extra={"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}).stdout)
    assert plain >= 16000  # one fault per 4 KiB page of 64 MiB
    assert huge < plain / 4, (plain, huge)  # 2 MiB pages: ideally 32 faults; room for a kernel short of huge pages
