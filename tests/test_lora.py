"""Tests for paligemma/lora.py and LoRA training: exactness at initialisation (plain, bf16 and int8 bases),
gradients through quantized bases, only the adapter training, PEFT interoperability both ways (on
transformers, the test-only reference), merging, refusals, the CLI, and the shipped shapes adapter."""

import json
from pathlib import Path

import pytest
import torch

import paligemma
from paligemma import lora
from paligemma.cli import main as cli_main
from paligemma.cpu import features, formats
from paligemma.shapes import synthetic
from paligemma.errors import CheckpointError, InputError
from paligemma.lora import LoRAConfig, apply_lora, load_adapter, merge_lora, save_adapter, unload_lora
from paligemma.testing import tiny_config, write_random_checkpoint
from paligemma.train import Example, TrainConfig, train

from .conftest import hf_model, rel_diff

EVERYWHERE = ("all-linear", "vision", "projector")


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """bf16 on disk (as Google's checkpoints): the bf16 base holds exactly the stored weights."""
    return write_random_checkpoint(tmp_path_factory.mktemp("lora-bf16"), tiny_config("pg1"), seed=3,
                                   dtype=torch.bfloat16)


def batch_of(model, processor, n=2, suffix=True):
    scenes = [synthetic.make_scene(s) for s in range(n)]
    return dict(processor(text=["caption en"] * n, images=[s.image for s in scenes],
                          suffix=[synthetic.caption(s) for s in scenes] if suffix else None))


def randomize_b(model, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)


@pytest.mark.parametrize("fmt", [None, "bf16", "int8"])
def test_lora_at_init_gives_the_base_logits_bit_for_bit(bf16_dir, fmt):
    model, processor = paligemma.load(bf16_dir, dtype=torch.float32, quantize=fmt)
    batch = batch_of(model, processor)
    with torch.no_grad():
        base = model(**batch).logits
        layers = apply_lora(model, LoRAConfig(rank=4, targets=EVERYWHERE))
        adapted = model(**batch).logits
    assert len(layers) == 2 * 7 + 2 * 6 + 1  # decoder, vision tower, projector
    assert torch.equal(adapted, base)
    model.train()  # dropout on, autograd on: still exact while B = 0
    assert torch.equal(model(**batch).logits.detach(), base)


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
def test_gradients_through_a_fast_format_base_equal_autograd_through_its_dense_weights(bf16_dir, fmt, monkeypatch):
    """The backward of cpu/autograd.py (grad_x = grad_y @ W, W widened per call) against plain autograd over
    the same weights dequantized into nn.Linear modules, with activation checkpointing on the fast one.
    Forward GEMMs in fp32 (on CPUs with bf16 units the fast formats' forward rounds activations to bf16)."""
    monkeypatch.setattr(features, "_override", "fp32")
    fast, processor = paligemma.load(bf16_dir, dtype=torch.float32, quantize=fmt)
    plain, _ = paligemma.load(bf16_dir, dtype=torch.float32, quantize=None)
    with torch.no_grad():  # plain := the fast model's dequantized weights
        for name, m in fast.named_modules():
            if hasattr(m, "fmt"):
                w = m.weight.float() * (m.weight_scale[:, None] if m.weight_scale is not None else 1)
                plain.get_submodule(name).weight.copy_(w)
    batch = batch_of(fast, processor)
    grads = []
    for model, ckpt in ((plain, False), (fast, True)):
        torch.manual_seed(0)
        apply_lora(model, LoRAConfig(rank=4, targets=EVERYWHERE))
        randomize_b(model)
        model.train()
        model.gradient_checkpointing = ckpt
        model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert grads[0].keys() == grads[1].keys()
    first = "vision_tower.encoder.layers.0.self_attn.q_proj.lora_A"  # the deepest: every layer's backward in it
    assert grads[1][first].abs().max() > 0
    for n in grads[0]:
        assert rel_diff(grads[1][n], grads[0][n]) < 1e-4, n


def test_one_step_changes_only_the_adapter(bf16_dir):
    model, processor = paligemma.load(bf16_dir, dtype=torch.float32, quantize="int8")
    examples = [Example(synthetic.make_scene(s).image, "caption en", "a red circle") for s in range(4)]
    cfg = TrainConfig(steps=1, batch_size=2, warmup=0, lr=1e-2, lora_rank=2, lora_targets=("attn", "projector"),
                      base_format="int8", gradient_checkpointing=True, progress=False)
    layers = apply_lora(model, cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, processor, examples, cfg)
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {f"{n}.lora_B" for n in layers}  # A's first gradient is 0 (B = 0): Adam leaves it
    assert sum(p.requires_grad for p in model.parameters()) == 2 * len(layers)


def test_lora_resume_matches_the_uninterrupted_run(bf16_dir, tmp_path):
    """checkpoint.pt of a LoRA run holds the adapter (not the base) and the optimizer; resuming from step 2 of a
    4-step run ends on the uninterrupted run's adapter exactly."""
    exs = [Example(synthetic.make_scene(s).image, "caption en", "a red circle") for s in range(3)]
    cfg = dict(batch_size=3, lr=5e-3, warmup=2, progress=False, seed=1, lora_rank=2, lora_targets=("attn",),
               base_format="bf16")
    runs = {}
    for name, steps, resume in (("full", 4, False), ("half", 2, False), ("half", 4, True)):
        model, processor = paligemma.load(bf16_dir, quantize="bf16")
        train(model, processor, exs, TrainConfig(steps=steps, **cfg), out_dir=str(tmp_path / name), resume=resume)
        runs[name] = lora.adapter_state_dict(model)
    ck = torch.load(tmp_path / "half" / "checkpoint.pt", weights_only=True)
    assert "model" not in ck and all(".lora_" in k for k in ck["adapter"])
    for k, v in runs["full"].items():
        assert torch.equal(v, runs["half"][k]), k
    model, processor = paligemma.load(bf16_dir, quantize="bf16")
    with pytest.raises(InputError, match="does not match"):
        train(model, processor, exs, TrainConfig(steps=5, **{**cfg, "lora_rank": 4}), out_dir=str(tmp_path / "half"),
              resume=True)


def test_saved_adapter_loads_in_peft_with_the_same_logits(pg1_dir, tmp_path):
    from peft import PeftModel

    model, processor = paligemma.load(pg1_dir, dtype=torch.float32, quantize=None)
    torch.manual_seed(0)
    apply_lora(model, LoRAConfig(rank=4, alpha=6, targets=EVERYWHERE))
    randomize_b(model)
    batch = batch_of(model, processor, suffix=False)
    with torch.no_grad():
        ours = model(**batch).logits
    save_adapter(model, tmp_path / "ad", base_model=str(pg1_dir))
    theirs_model = PeftModel.from_pretrained(hf_model(pg1_dir), tmp_path / "ad").eval()
    n_wrapped = sum(type(m).__name__ == "Linear" and hasattr(m, "lora_A") for m in theirs_model.modules())
    assert n_wrapped == len(lora.lora_layers(model))
    with torch.no_grad():
        theirs = theirs_model(**batch).logits
    assert rel_diff(ours, theirs) < 1e-5
    assert rel_diff(ours, hf_model(pg1_dir)(**batch).logits) > 1e-3  # the adapter does change the logits


def test_a_peft_made_adapter_loads_here_with_the_same_logits(pg1_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    theirs_model = get_peft_model(hf_model(pg1_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                                   "down_proj"]))
    with torch.no_grad():
        for n, p in theirs_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    theirs_model.save_pretrained(tmp_path / "peft")
    model, processor = paligemma.load(pg1_dir, dtype=torch.float32, quantize=None, adapter=tmp_path / "peft")
    batch = batch_of(model, processor, suffix=False)
    with torch.no_grad():
        theirs = theirs_model.eval()(**batch).logits
        ours = model(**batch).logits
    assert len(lora.lora_layers(model)) == 2 * 3 + 2 * 2  # q, v, down in the decoder; q, v in the vision tower
    assert rel_diff(ours, theirs) < 1e-5


def test_merge_equals_the_unmerged_forward_and_unload_restores_the_base(pg1_dir, tmp_path):
    model, processor = paligemma.load(pg1_dir, dtype=torch.float32, quantize=None)
    batch = batch_of(model, processor, suffix=False)
    with torch.no_grad():
        base = model(**batch).logits
        apply_lora(model, LoRAConfig(rank=4, targets=EVERYWHERE))
        randomize_b(model)
        save_adapter(model, tmp_path / "ad")
        unmerged = model(**batch).logits
        assert torch.equal(unload_lora(model)(**batch).logits, base)
        load_adapter(model, tmp_path / "ad")
        assert torch.equal(model(**batch).logits, unmerged)
        merged = merge_lora(model)(**batch).logits
    assert not lora.has_lora(model)
    assert rel_diff(merged, unmerged) < 1e-5
    assert rel_diff(merged, base) > 1e-3


def _saved_adapter(pg1_dir, tmp_path, **cfg) -> Path:
    model, _ = paligemma.load(pg1_dir, dtype=torch.float32, quantize=None)
    apply_lora(model, LoRAConfig(**cfg))
    return save_adapter(model, tmp_path / "ad")


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / lora.ADAPTER_CONFIG).read_text())
    cfg.update(changes)
    (d / lora.ADAPTER_CONFIG).write_text(json.dumps(cfg))


def test_mismatched_adapters_are_refused(pg1_dir, pg2_dir, tmp_path):
    ad = _saved_adapter(pg1_dir, tmp_path, rank=4, targets=("attn",))
    with pytest.raises(CheckpointError, match="different base model|lacks"):  # other widths and layers
        paligemma.load(pg2_dir, adapter=ad)
    _edit_config(ad, r=8)
    with pytest.raises(CheckpointError, match="rank"):
        paligemma.load(pg1_dir, adapter=ad)
    _edit_config(ad, r=4, target_modules=["q_proj", "k_proj"])  # says: also the vision tower, not v/o
    with pytest.raises(CheckpointError, match="target_modules"):
        paligemma.load(pg1_dir, adapter=ad)
    _edit_config(ad, use_dora=True)
    with pytest.raises(CheckpointError, match="use_dora"):
        paligemma.load(pg1_dir, adapter=ad)
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        paligemma.load(pg1_dir, adapter=tmp_path)
    model, _ = paligemma.load(pg1_dir, quantize=None)
    apply_lora(model, LoRAConfig(rank=2, targets=("attn",)))
    ad2 = _saved_adapter(pg1_dir, tmp_path / "b", rank=4, targets=("attn",))
    with pytest.raises(InputError, match="already holds LoRA layers"):
        load_adapter(model, ad2)
    with pytest.raises(InputError, match="unknown LoRA target"):
        LoRAConfig(targets=("c_attn",))
    with pytest.raises(CheckpointError, match="LoRA layers"):
        paligemma.save_pretrained(model, None, tmp_path / "full")
    with pytest.raises(InputError, match="lora_rank"):
        TrainConfig(base_format="int8")


def test_cli_train_lora_then_run_with_the_adapter(bf16_dir, tmp_path, capsys):
    data = synthetic.write_jsonl(str(tmp_path / "data"), "train", 2)
    out = tmp_path / "run"
    argv = ["train", "--model", str(bf16_dir), "--data", data, "--out", str(out), "--steps", "2", "--batch-size",
            "2", "--lora-rank", "2", "--lora-targets", "q_proj,v_proj", "--base-format", "int8", "--merge",
            "--no-progress", "--warmup", "0", "--lr", "1e-2"]
    assert cli_main(argv) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    image = tmp_path / "data" / "images" / "train_0.png"
    capsys.readouterr()
    assert cli_main(["--model", str(bf16_dir), "--adapter", str(out), "--image", str(image), "--prompt", "caption en",
                     "--max-tokens", "4", "--no-stream"]) == 0
    assert capsys.readouterr().out.strip()
    # the merged checkpoint = base + adapter (merged from the bf16 checkpoint, not from the int8 training copy)
    merged, processor = paligemma.load(out / "merged", quantize=None)
    adapted, _ = paligemma.load(bf16_dir, quantize=None, adapter=out)
    batch = batch_of(merged, processor, suffix=False)
    with torch.no_grad():
        assert rel_diff(merged(**batch).logits, adapted(**batch).logits) < 1e-2  # bf16 rounding of the fold
    assert cli_main(["--model", str(bf16_dir), "--adapter", str(tmp_path), "--image", str(image)]) == 1
    assert "adapter_config.json" in capsys.readouterr().err


SHIPPED_ADAPTER = Path(paligemma.__file__).parent / "assets" / "shapes-tiny-left-color"


def test_the_shipped_adapter_teaches_a_new_task_and_unloading_restores_the_base():
    """`python -m paligemma.shapes.lora_recipe` made it: `answer en what color is the left shape?` on held-out
    scenes; the base model's own outputs are the same bit for bit once it is unloaded."""
    from paligemma.shapes import lora_recipe

    assert (SHIPPED_ADAPTER / lora.ADAPTER_WEIGHTS).stat().st_size < 2**20
    model, processor = paligemma.load(paligemma.SHAPES_TINY)
    scenes = [synthetic.make_scene(s) for s in synthetic.split_seeds("test", 8)]
    prompts = ["caption en", synthetic.COUNT_PROMPT, "detect circle", lora_recipe.PROMPT] * 2
    batch = dict(processor(text=prompts, images=[s.image for s in scenes]))
    with torch.no_grad():
        base = model(**batch).logits
        base_ids = model.generate(**batch, max_new_tokens=12)
    assert lora_recipe.accuracy(model, processor, n=32) < 0.5  # the base cannot do it (measured: 0 of 300)
    load_adapter(model, SHIPPED_ADAPTER)
    assert lora_recipe.accuracy(model, processor, n=200) >= 0.95  # the recipe measured 0.993 on 300
    unload_lora(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base)
        assert torch.equal(model.generate(**batch, max_new_tokens=12), base_ids)


def test_batch_runs_the_shipped_adapter(tmp_path, capsys):
    from paligemma.shapes import lora_recipe

    folder = tmp_path / "scenes"
    folder.mkdir()
    scenes = {f"s{i}.png": synthetic.make_scene(s) for i, s in enumerate(synthetic.split_seeds("test", 6))}
    for name, scene in scenes.items():
        scene.image.save(folder / name)
    out = tmp_path / "colors.jsonl"
    assert cli_main(["batch", "--input", str(folder), "--output", str(out), "--prompt", lora_recipe.PROMPT,
                     "--adapter", str(SHIPPED_ADAPTER), "--no-progress"]) == 0
    rows = {r["id"]: r["text"] for r in map(json.loads, out.read_text().splitlines())}
    assert sum(rows[n] == lora_recipe.left_color(sc) for n, sc in scenes.items()) >= 5


def test_serve_loads_the_adapter_over_its_model():
    from paligemma.cli.serve import build_parser, config_from_args
    from paligemma.serve.app import ServerState
    from paligemma.serve.metrics import ServeMetrics

    config = config_from_args(build_parser().parse_args(["--adapter", str(SHIPPED_ADAPTER)]))
    state = ServerState(config, ServeMetrics())
    state.load()
    try:
        assert len(lora.lora_layers(state.engine.model)) == 28
    finally:
        state.engine.stop(grace=1.0)
