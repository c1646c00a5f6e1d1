"""boundprop.runtime: keeping freed memory in the process (each case in a fresh interpreter)."""

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, statistics, torch
from boundprop.runtime import keep_freed_memory
first = keep_freed_memory()
assert keep_freed_memory() == first  # idempotent
faults = []
for _ in range(6):  # 64 MiB: above glibc's largest dynamic mmap threshold (32 MiB)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(2**24)
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(first, int(statistics.median(faults[1:])))
"""


def _probe(env_value: str | None) -> tuple[bool, int]:
    env = dict(os.environ)
    env.pop("BOUNDPROP_MALLOC", None)
    if env_value is not None:
        env["BOUNDPROP_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_kept_memory_is_reused_without_page_faults():
    applied, faults = _probe(None)
    if not applied:
        pytest.skip("not glibc")
    assert faults < 100  # the freed block is reused (16,384 fresh pages per tensor without)


def test_default_malloc_can_be_kept():
    applied, faults = _probe("default")
    assert not applied
    if sys.platform.startswith("linux"):
        assert faults > 10_000  # glibc's default: every 64 MiB block is mapped afresh
