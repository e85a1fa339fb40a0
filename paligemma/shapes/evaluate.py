"""Evaluate a model on held-out synthetic shapes scenes (paligemma/synthetic.py).

Three figures, computed from greedy generations parsed the way a user would parse them:

* caption exact match: the generated `caption en` equals the reference string;
* counting accuracy: `answer en how many shapes?` equals "1" / "2" / "3";
* detection: for every shape kind present in a scene, `detect <kind>` is parsed with
  `paligemma.tasks.parse_detections`; predictions are matched to ground-truth boxes greedily by IoU.
  `detect_miou` is the mean IoU over ground-truth objects (an unmatched object scores 0) and
  `detect_count_acc` the share of queries that return exactly the right number of boxes.
  `absent_acc` is the share of `detect <kind>` queries for a kind not in the scene that return no box.

    python -m paligemma.shapes.evaluate paligemma/assets/shapes-tiny --n 500 [--quantize int8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import torch

from .synthetic import (CAPTION_PROMPT, COUNT_PROMPT, SHAPES, Scene, caption, make_scene,
                        split_seeds)
from ..tasks import parse_detections


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x0, y0, x1, y1) boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_ious(pred: list, gt: list) -> list[float]:
    """Greedy one-to-one matching by IoU; returns one IoU per ground-truth box (0 if unmatched)."""
    pairs = sorted(((box_iou(p, g), i, j) for i, p in enumerate(pred) for j, g in enumerate(gt)),
                   reverse=True)
    used_p, best = set(), [0.0] * len(gt)
    used_g = set()
    for iou, i, j in pairs:
        if iou <= 0 or i in used_p or j in used_g:
            continue
        used_p.add(i)
        used_g.add(j)
        best[j] = iou
    return best


@torch.no_grad()
def generate_texts(model, processor, images, prompts: list[str], batch_size: int = 64,
                   max_new_tokens: int = 40) -> list[str]:
    out = []
    device = next(model.parameters()).device
    for i in range(0, len(prompts), batch_size):
        batch = processor(text=prompts[i:i + batch_size], images=images[i:i + batch_size]).to(device)
        ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        out += [t.strip() for t in processor.batch_decode(ids)]
    return out


def queries(scene: Scene, absent: bool = True) -> list[tuple[str, str]]:
    """(kind of query, prompt) pairs asked of one scene."""
    q = [("caption", CAPTION_PROMPT), ("count", COUNT_PROMPT)]
    present = [k for k in SHAPES if any(sh.kind == k for sh in scene.shapes)]
    q += [("detect", f"detect {k}") for k in present]
    missing = [k for k in SHAPES if k not in present]
    if absent and missing:
        q.append(("absent", f"detect {missing[scene.seed % len(missing)]}"))
    return q


def evaluate(model, processor, n: int = 500, split: str = "test", image_size: int | None = None,
             batch_size: int = 64, return_failures: bool = False) -> dict:
    """Generate on `n` scenes of `split` and score them (see the module docstring)."""
    size = image_size or processor.image_size
    was_training = model.training
    model.eval()
    t0 = time.time()
    scenes = [make_scene(s, size=size) for s in split_seeds(split, n)]
    asks = [(sc, kind, prompt) for sc in scenes for kind, prompt in queries(sc)]
    asks.sort(key=lambda a: a[1])   # one task per batch: prompts of equal length, less padding
    texts = generate_texts(model, processor, [a[0].image for a in asks], [a[2] for a in asks],
                           batch_size)
    cap, cnt, det_iou, det_cnt, absent = [], [], [], [], []
    failures = []
    for (sc, kind, prompt), text in zip(asks, texts):
        if kind == "caption":
            ok = text == caption(sc)
            cap.append(ok)
        elif kind == "count":
            ok = text == str(len(sc.shapes))
            cnt.append(ok)
        elif kind == "absent":
            ok = len(parse_detections(text, size, size)) == 0
            absent.append(ok)
        else:
            label = prompt.split(" ", 1)[1]
            gt = [sh.box for sh in sc.shapes if sh.kind == label]
            pred = [d.box for d in parse_detections(text, size, size) if d.label == label]
            ious = match_ious(pred, gt)
            det_iou += ious
            ok = len(pred) == len(gt)
            det_cnt.append(ok)
            ok = ok and min(ious) >= 0.5
        if not ok:
            failures.append({"seed": sc.seed, "prompt": prompt, "output": text})
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else float("nan")  # noqa: E731
    res = {"n_scenes": n, "split": split, "caption_exact": mean(cap), "count_acc": mean(cnt),
           "detect_miou": mean(det_iou), "detect_count_acc": mean(det_cnt),
           "absent_acc": mean(absent), "n_queries": len(asks),
           "seconds": round(time.time() - t0, 1)}
    model.train(was_training)
    if return_failures:
        res["failures"] = failures
    return res


TARGETS = {"caption_exact": 0.95, "count_acc": 0.95, "detect_miou": 0.75, "detect_count_acc": 0.95}


def meets_targets(res: dict) -> dict[str, bool]:
    return {k: res[k] >= v for k, v in TARGETS.items()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m paligemma.shapes.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("model", help="checkpoint directory (e.g. paligemma/assets/shapes-tiny)")
    p.add_argument("--n", type=int, default=500, help="number of test scenes")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--show-failures", type=int, default=0, help="print up to this many failures")
    p.add_argument("--quantize", default="none", choices=("none", "auto", "int8", "bf16", "fp32"),
                   help="CPU weight format (default none: the plain fp32 model)")
    args = p.parse_args(argv)
    from ..loading import load
    model, processor = load(args.model, dtype=torch.float32, device="cpu",
                            quantize=None if args.quantize == "none" else args.quantize)
    res = evaluate(model, processor, args.n, args.split, batch_size=args.batch_size,
                   return_failures=True)
    failures = res.pop("failures")
    print(json.dumps(res, indent=1))
    for f in failures[:args.show_failures]:
        print(f, file=sys.stderr)
    return 0 if all(meets_targets(res).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
