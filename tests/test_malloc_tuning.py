"""malloc_tuning in a child process (it changes process-wide allocator settings):
record-sized buffers come from the heap, and a prewarmed heap serves them
without faulting in fresh pages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spirtd import malloc_tuning

REPO = Path(__file__).resolve().parent.parent

CHILD = """
import json, resource, sys
from spirtd import malloc_tuning
tuned = malloc_tuning.tune()
if sys.argv[1] == "prewarm":
    malloc_tuning.prewarm_heap(32 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
bufs = [bytearray(256 * 1024) for _ in range(96)]  # 24 MiB of record buffers
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"tuned": tuned, "faults": after - before}))
"""


def faults(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=True,
    )
    return json.loads(out.stdout)


def test_prewarmed_heap_serves_record_buffers_without_fresh_pages() -> None:
    cold, warm = faults("cold"), faults("prewarm")
    if not cold["tuned"]:
        pytest.skip("the C library is not glibc: there is nothing to tune")
    # 24 MiB is 6144 pages: cold, each is faulted in; warm, they are already ours.
    assert cold["faults"] > 5000
    assert warm["faults"] < 500


def test_prewarm_is_bounded_by_what_the_heap_keeps() -> None:
    with pytest.raises(ValueError):
        malloc_tuning.prewarm_heap(malloc_tuning.TRIM_THRESHOLD + 1)
