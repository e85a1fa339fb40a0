"""allocator.py: training's allocator setting and a long prompt's heap trims hand freed activation memory
back to the OS."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import paligemma
from paligemma import allocator
from paligemma.errors import InputError

from .conftest import make_inputs

# A checkpointed forward in miniature: each "layer" makes 3-5 MB transients, then its output (1 MB) while
# they are alive; the output is kept (as checkpointing keeps each layer's input), the transients freed.
PATTERN = textwrap.dedent("""
    import sys, torch
    from paligemma.allocator import return_freed_memory
    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    from paligemma.allocator import release_heap
    set_to = return_freed_memory() if sys.argv[1] == "on" else 0
    big = torch.ones(40 << 18); del big   # a freed 40 MB mapping: glibc raises its threshold by default
    base, kept, x = rss_mb(), [], torch.ones(1 << 18)
    for layer in range(40):
        tmp = [x.repeat(3 + i % 3) for i in range(8)]
        x = tmp[-1][: 1 << 18].clone()
        kept.append(x)
        del tmp
        if sys.argv[1] == "trim":
            release_heap()
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


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc's allocator only (Linux)")
def test_a_trim_hands_the_freed_fragments_back():
    """glibc's defaults keep the freed transients between kept tensors; `release_heap` after each layer returns
    them, with the threshold left alone (inference's setting)."""
    set_to, growth_trim = _growth("trim")
    assert set_to == 0 and growth_trim <= 40 + 10, growth_trim
    _, growth_off = _growth("off")
    assert growth_off >= growth_trim + 20, (growth_off, growth_trim)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_long_prompts_trim_every_few_layers_and_keep_every_bit(pg1_dir, monkeypatch, quantize):
    """generation.prefill trims every TRIM_EVERY layers (vision and text) for a prompt of PALIGEMMA_TRIM_ROWS
    tokens or more, never for a shorter one; the tokens and logits are those of a run without trims, and no
    hook is left on the model."""
    model = paligemma.load_model(pg1_dir, quantize=quantize)
    ids, tt, pix = make_inputs(model)
    calls = []
    monkeypatch.setattr(allocator, "release_heap", lambda: calls.append(1) or True)

    def run(rows_env: str):
        monkeypatch.setenv("PALIGEMMA_TRIM_ROWS", rows_env)
        calls.clear()
        with torch.no_grad():
            out = model.generate(ids, pix, token_type_ids=tt, max_new_tokens=4)
            logits = model(ids, pix, token_type_ids=tt).logits
        return out, logits, len(calls)

    plain_out, plain_logits, none = run("0")
    layers = len(model.vision_tower.encoder.layers) + len(model.language_model.layers)
    out, logits, trims = run(str(ids.numel()))  # the prompt is just long enough
    assert none == 0 and trims == layers // allocator.TRIM_EVERY > 0
    assert torch.equal(out, plain_out) and torch.equal(logits, plain_logits)
    assert run(str(ids.numel() + 1))[2] == 0  # one token short of the limit: no trims
    assert all(not m._forward_hooks for m in model.modules())


def test_trim_rows_from_the_environment(monkeypatch):
    monkeypatch.delenv("PALIGEMMA_TRIM_ROWS", raising=False)
    assert allocator.trim_rows() == 1024
    monkeypatch.setenv("PALIGEMMA_TRIM_ROWS", "0")
    assert allocator.trim_rows() == 0
    with allocator.released_per_layer([torch.nn.Linear(2, 2)], rows=10**6) as watched:
        assert watched == 0  # off
    for bad in ("abc", "-1", "1e3"):
        monkeypatch.setenv("PALIGEMMA_TRIM_ROWS", bad)
        with pytest.raises(InputError, match="PALIGEMMA_TRIM_ROWS"):
            allocator.trim_rows()
