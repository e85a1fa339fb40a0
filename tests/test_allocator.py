"""cpu/allocator.py: training's allocator setting hands freed activation memory back to the OS."""

import os
import subprocess
import sys
import textwrap

import pytest

from paligemma.cpu import allocator
from paligemma.errors import InputError

# A checkpointed forward in miniature: each "layer" makes 3-5 MB transients, then its output (1 MB) while
# they are alive; the output is kept (as checkpointing keeps each layer's input), the transients freed.
PATTERN = textwrap.dedent("""
    import sys, torch
    from paligemma.cpu.allocator import return_freed_memory
    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    set_to = return_freed_memory() if sys.argv[1] == "on" else 0
    big = torch.ones(40 << 18); del big   # a freed 40 MB mapping: glibc raises its threshold by default
    base, kept, x = rss_mb(), [], torch.ones(1 << 18)
    for layer in range(40):
        tmp = [x.repeat(3 + i % 3) for i in range(8)]
        x = tmp[-1][: 1 << 18].clone()
        kept.append(x)
        del tmp
    print(set_to, rss_mb() - base)
""")


def _growth(mode: str) -> tuple[int, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "PALIGEMMA_MMAP"))}
    out = subprocess.run([sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout.split()
    return int(out[0]), float(out[1])


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc's allocator only (Linux)")
def test_freed_activations_go_back_to_the_os():
    kept_mb = 40 * 1.0
    set_to, growth_on = _growth("on")
    assert set_to == allocator.DEFAULT_THRESHOLD
    assert growth_on <= kept_mb + 10, growth_on  # only the kept tensors stay resident
    _, growth_off = _growth("off")
    assert growth_off >= growth_on + 20, (growth_off, growth_on)  # glibc's default keeps the fragments


def test_threshold_from_the_environment(monkeypatch):
    monkeypatch.delenv("PALIGEMMA_MMAP_THRESHOLD", raising=False)
    assert allocator.threshold() == 1 << 20
    monkeypatch.setenv("PALIGEMMA_MMAP_THRESHOLD", "0")
    assert allocator.threshold() == 0 and allocator.return_freed_memory() == 0  # off: nothing changed
    for bad in ("abc", "-1", str(64 << 20)):
        monkeypatch.setenv("PALIGEMMA_MMAP_THRESHOLD", bad)
        with pytest.raises(InputError, match="PALIGEMMA_MMAP_THRESHOLD"):
            allocator.threshold()
