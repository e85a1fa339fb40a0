"""Teach the shipped shapes-tiny model a task it has never seen with a small LoRA adapter.

The task: `answer en what color is the left shape?` -> the colour of the leftmost shape ("red", ...), from
the scene generator (`synthetic.make_scene`; shapes are sorted left to right). The base model was trained
on captions, counts and detections only; asked this question it answers nonsense. A rank-8 adapter on the
decoder's linear layers (94 k parameters, 4% of the model) is trained on train-split scenes and scored by
exact match on 300 held-out test-split scenes. The base is never modified: with the adapter unloaded,
its own figures (`eval_shapes.evaluate`) are the same, bit for bit, as before training.

    python -m paligemma.shapes.lora_recipe --out paligemma/assets/shapes-tiny-left-color   # a few minutes, 2 threads
    python -m paligemma.shapes.lora_recipe --eval-only paligemma/assets/shapes-tiny-left-color
    python -m paligemma.shapes.lora_recipe --write-jsonl data/left      # the task as training JSONL

`write_jsonl` writes the task in the training JSONL format (the README's worked example uses it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import torch

from . import synthetic
from .evaluate import evaluate, generate_texts
from ..loading import load
from ..lora import load_adapter, save_adapter, unload_lora
from ..train import Example, TrainConfig, train

PROMPT = "answer en what color is the left shape?"
TARGET = 0.95


def left_color(scene: synthetic.Scene) -> str:
    return scene.shapes[0].color


def examples(split: str, n: int, start: int = 0) -> list[Example]:
    scenes = [synthetic.make_scene(s) for s in synthetic.split_seeds(split, n, start)]
    return [Example(sc.image, PROMPT, left_color(sc)) for sc in scenes]


def write_jsonl(out_dir: str, split: str, n: int) -> str:
    """`n` scenes of `split` as PNGs + `{split}.jsonl` lines {"image", "prefix": PROMPT, "suffix": colour}."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    path = os.path.join(out_dir, f"{split}.jsonl")
    with open(path, "w") as f:
        for seed in synthetic.split_seeds(split, n):
            scene = synthetic.make_scene(seed)
            rel = f"images/{split}_{seed}.png"
            scene.image.save(os.path.join(out_dir, rel))
            f.write(json.dumps({"image": rel, "prefix": PROMPT, "suffix": left_color(scene)}) + "\n")
    return path


@torch.no_grad()
def accuracy(model, processor, n: int = 300, split: str = "test") -> float:
    """Exact match of the greedy answer on `n` scenes of `split`."""
    scenes = [synthetic.make_scene(s) for s in synthetic.split_seeds(split, n)]
    texts = generate_texts(model, processor, [sc.image for sc in scenes], [PROMPT] * n, max_new_tokens=8)
    return sum(t == left_color(sc) for t, sc in zip(texts, scenes)) / n


def recipe_config(steps: int = 300, rank: int = 8) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=32, lr=3e-3, warmup=20, min_lr_ratio=0.05, lora_rank=rank,
                       lora_alpha=2.0 * rank, lora_targets=("all-linear",), eval_every=0, log_every=25,
                       seed=0, progress=False)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m paligemma.shapes.lora_recipe", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(synthetic_model_dir()), help="base checkpoint (default: shapes-tiny)")
    p.add_argument("--out", help="where the adapter goes")
    p.add_argument("--eval-only", metavar="ADAPTER", help="score a saved adapter instead of training one")
    p.add_argument("--write-jsonl", metavar="DIR", help="only write the task as DIR/train.jsonl (--n-train scenes) "
                                                        "and DIR/val.jsonl (64) with their images, then stop")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--n-train", type=int, default=4000, help="train-split scenes")
    p.add_argument("--n-test", type=int, default=300, help="held-out test-split scenes")
    p.add_argument("--n-base", type=int, default=300, help="test scenes for the base figures (0: skip)")
    args = p.parse_args(argv)
    if args.write_jsonl:
        for split, n in (("train", args.n_train), ("val", 64)):
            print(write_jsonl(args.write_jsonl, split, n))
        return 0
    model, processor = load(args.model, dtype=torch.float32, device="cpu", quantize=None)
    base_before = evaluate(model, processor, n=args.n_base) if args.n_base else None
    report = {"base_accuracy": round(accuracy(model, processor, args.n_test), 4)}
    t0 = time.time()
    if args.eval_only:
        load_adapter(model, args.eval_only)
    else:
        train(model, processor, examples("train", args.n_train), recipe_config(args.steps, args.rank),
              val_examples=examples("val", 64))
        report["train_s"] = round(time.time() - t0, 1)
        if args.out:
            save_adapter(model, args.out, base_model="paligemma/assets/shapes-tiny")
    report["adapter_accuracy"] = round(accuracy(model, processor, args.n_test), 4)
    unload_lora(model)
    if base_before is not None:
        base_after = evaluate(model, processor, n=args.n_base)
        same = {k: v for k, v in base_before.items() if k != "seconds"} == \
               {k: v for k, v in base_after.items() if k != "seconds"}
        report["base_figures"] = {k: v for k, v in base_after.items() if k not in ("seconds", "split")}
        report["base_figures_unchanged"] = same
    report["met"] = report["adapter_accuracy"] >= TARGET and report.get("base_figures_unchanged", True)
    print(json.dumps(report, indent=1))
    return 0 if report["met"] else 1


def synthetic_model_dir():
    from .. import SHAPES_TINY

    return SHAPES_TINY


if __name__ == "__main__":
    sys.exit(main())
