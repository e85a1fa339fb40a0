"""Build the shipped `shapes-tiny` model: a small PaliGemma trained from scratch on synthetic shapes.

One command does everything (data, tokenizer, from-scratch training, 500-scene test, model card):

    python -m paligemma.shapes.recipe --out paligemma/assets/shapes-tiny --work runs/shapes

1. `synthetic.write_jsonl` writes train / val / test scenes (disjoint seed ranges) as JSONL + PNGs;
2. `shapes.tokenizer_train.train_tokenizer` learns a small Gemma-layout BPE vocabulary on the task's words
   (loc/seg/`<image>` tokens appended as in the official vocabulary);
3. a PaliGemma-1-style config (SigLIP + Gemma, MQA) a few million parameters large is built and
   randomly initialised (`init_for_shapes`), then trained with `paligemma.train.train`;
4. `shapes.evaluate.evaluate` scores 500 held-out test scenes; the model, tokenizer, configs and a
   MODEL_CARD.md with the figures are written to `--out` with `paligemma.save_pretrained`.

The same seed gives the same data, init and batch order; figures then agree within CPU float noise.
The model knows nothing but these shapes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from . import synthetic
from ..config import PaliGemmaConfig
from .evaluate import TARGETS, evaluate, meets_targets
from ..modeling_paligemma import PaliGemmaForConditionalGeneration
from ..processing_paligemma import PaliGemmaProcessor
from ..tokenizer import GemmaTokenizer
from ..train import TrainConfig, load_jsonl, train

IMAGE_SIZE = 64
PATCH = 16
BASE_VOCAB = 448     # specials + bytes + learned pieces; loc/seg/<image> (1153 ids) come on top


def shapes_config(image_token_index: int, vocab_size: int, width: int = 128, layers: int = 4,
                  vision_width: int = 128, vision_layers: int = 4, patch: int = PATCH, kv_heads: int = 0) -> dict:
    """config.json of the shipped model: 64 px images in `patch` px patches."""
    heads = max(1, width // 32)
    return {
        "model_type": "paligemma", "architectures": ["PaliGemmaForConditionalGeneration"],
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "image_token_index": image_token_index,
        "projection_dim": width, "hidden_size": width, "vocab_size": vocab_size,
        "text_config": {"model_type": "gemma", "hidden_size": width, "intermediate_size": 4 * width,
                        "num_hidden_layers": layers, "num_attention_heads": heads,
                        "num_key_value_heads": kv_heads or heads, "head_dim": width // heads, "vocab_size": vocab_size,
                        "max_position_embeddings": 256, "num_image_tokens": (IMAGE_SIZE // patch) ** 2},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": vision_width,
                          "intermediate_size": 4 * vision_width, "num_hidden_layers": vision_layers,
                          "num_attention_heads": max(1, vision_width // 32), "patch_size": patch,
                          "image_size": IMAGE_SIZE, "num_image_tokens": (IMAGE_SIZE // patch) ** 2,
                          "projection_dim": width, "vision_use_head": False},
    }


def _sincos(positions: torch.Tensor, dim: int, max_period: float, min_period: float) -> torch.Tensor:
    """[N] positions -> [N, dim] sin/cos features with periods geometric from max to min period."""
    half = dim // 2
    periods = max_period * (min_period / max_period) ** (torch.arange(half) / max(half - 1, 1))
    ang = positions.float()[:, None] * (2 * math.pi / periods)[None]                 # [N, half]
    return torch.cat([ang.sin(), ang.cos()], -1)                                       # [N, 2*half]


@torch.no_grad()
def init_for_shapes(model: PaliGemmaForConditionalGeneration, loc_start: int, loc_dims: int = 32) -> None:
    """Width-aware random init, plus two ordinal codes that make localisation learnable fast.

    * Linear / conv weights ~ N(0, 1/fan_in) (LeCun), embeddings ~ N(0, 1/H) so that Gemma's
      sqrt(H) scaling gives unit-RMS token vectors. The core's N(0, 0.02) suits widths near 2048;
      at width 128 it starts every attention and MLP ~4x too small and training sits for
      thousands of steps before the decoder starts reading the image.
    * The vision position embedding starts as a 2-D sin/cos code of the patch's row and column
      (as big_vision's `posemb="sincos2d"`).
    * The `<locNNNN>` embeddings (tied to the output head) start as a unit-norm 1-D sin/cos code of
      NNNN in their first `loc_dims` dims (zeros elsewhere), so neighbouring bins start with
      similar logits and a coordinate is one smooth direction to produce.
    Everything stays trainable.
    """
    model.init_weights()   # zero biases, identity norms
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            fan_in = mod.weight[0].numel()
            mod.weight.normal_(0.0, fan_in ** -0.5)
    emb = model.language_model.embed_tokens.weight                                   # [V, H]
    h_std = emb.shape[1] ** -0.5
    emb.normal_(0.0, h_std)
    pe = model.vision_tower.embeddings.position_embedding.weight                      # [N, D]
    g = int(math.isqrt(pe.shape[0]))
    d4 = pe.shape[1] // 2
    rows, cols = torch.arange(g).repeat_interleave(g), torch.arange(g).repeat(g)
    code = torch.cat([_sincos(rows, d4, 4 * g, 2), _sincos(cols, d4, 4 * g, 2)], -1)     # [N, 2*d4]
    pe.zero_()
    pe[:, :code.shape[1]] = code
    bins = torch.arange(1024)
    emb[loc_start:loc_start + 1024] = 0.0   # unit-norm, purely ordinal: only the code, no noise
    emb[loc_start:loc_start + 1024, :loc_dims] = _sincos(bins, loc_dims, 4096, 32) * math.sqrt(2 / loc_dims)


def dense_targets(scene: synthetic.Scene, grid: int) -> dict[str, torch.Tensor]:
    """Per-patch targets of one scene for `pretrain_vision` (a CenterNet-style dense task).

    obj [g, g]: 1 in the patch holding a shape's box centre; color / kind [g, g]: its class ids;
    box [g, g, 4]: its (x0, y0, x1, y1) / size; cover [g, g, 9]: share of the patch inside boxes of
    each colour (6) and kind (3).
    """
    size, cell = scene.size, scene.size / grid
    colors, kinds = sorted(synthetic.COLORS), list(synthetic.SHAPES)
    obj = torch.zeros(grid, grid)
    color = torch.zeros(grid, grid, dtype=torch.long)
    kind = torch.zeros(grid, grid, dtype=torch.long)
    box = torch.zeros(grid, grid, 4)
    cover = torch.zeros(grid, grid, len(colors) + len(kinds))
    edges = torch.arange(grid + 1) * cell
    for sh in sorted(scene.shapes, key=lambda sh: (sh.box[2] - sh.box[0]) * (sh.box[3] - sh.box[1])):
        x0, y0, x1, y1 = sh.box
        r, c = min(int((y0 + y1) / 2 // cell), grid - 1), min(int((x0 + x1) / 2 // cell), grid - 1)
        obj[r, c] = 1                 # larger shapes are written last and win a shared cell
        color[r, c], kind[r, c] = colors.index(sh.color), kinds.index(sh.kind)
        box[r, c] = torch.tensor([x0, y0, x1, y1]) / size
        ov_x = (torch.minimum(edges[1:], torch.tensor(float(x1))) - torch.maximum(edges[:-1], torch.tensor(float(x0)))).clamp(min=0) / cell
        ov_y = (torch.minimum(edges[1:], torch.tensor(float(y1))) - torch.maximum(edges[:-1], torch.tensor(float(y0)))).clamp(min=0) / cell
        frac = ov_y[:, None] * ov_x[None, :]                                           # [g, g]
        cover[..., colors.index(sh.color)] += frac
        cover[..., len(colors) + kinds.index(sh.kind)] += frac
    return {"obj": obj, "color": color, "kind": kind, "box": box, "cover": cover.clamp(max=1)}


def pretrain_vision(model: PaliGemmaForConditionalGeneration, seeds: list[int], steps: int,
                    batch_size: int = 64, lr: float = 2e-3, seed: int = 0, log_every: int = 100) -> list[dict]:
    """Stage 1: train the SigLIP tower alone on dense per-patch targets of the training scenes.

    From random init, a decoder reading a random vision tower takes thousands of steps to start
    using the image at all; dense supervision gives the tower object, colour, kind and box features
    in a few minutes. The linear head used here is thrown away; stage 2 trains the whole model.
    """
    import torch.nn.functional as F

    tower = model.vision_tower
    cfg = model.config.vision
    grid = cfg.image_size // cfg.patch_size
    head = torch.nn.Linear(cfg.hidden_size, 1 + 6 + 3 + 4 + 9)
    scenes = [synthetic.make_scene(s, size=cfg.image_size) for s in seeds]
    pixels = torch.stack([torch.from_numpy(__import__("numpy").asarray(sc.image).copy()) for sc in scenes])
    pixels = pixels.permute(0, 3, 1, 2).contiguous()                                  # uint8 [N, 3, S, S]
    targets = [dense_targets(sc, grid) for sc in scenes]
    tgt = {k: torch.stack([t[k] for t in targets]) for k in targets[0]}
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    g = torch.Generator().manual_seed(seed)
    tower.train()
    history, t0 = [], time.time()
    for step in range(steps):
        idx = torch.randint(len(scenes), (batch_size,), generator=g)
        x = pixels[idx].float() / 127.5 - 1.0                                          # [B, 3, S, S]
        out = head(tower(x)).view(batch_size, grid, grid, -1)                          # [B, g, g, 23]
        t = {k: v[idx] for k, v in tgt.items()}
        has = t["obj"] > 0
        loss = F.binary_cross_entropy_with_logits(out[..., 0], t["obj"])
        loss = loss + F.binary_cross_entropy_with_logits(out[..., 14:], t["cover"])
        if has.any():
            loss = loss + F.cross_entropy(out[..., 1:7][has], t["color"][has])
            loss = loss + F.cross_entropy(out[..., 7:10][has], t["kind"][has])
            loss = loss + 10 * F.l1_loss(out[..., 10:14][has].sigmoid(), t["box"][has])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            with torch.no_grad():
                box_err = (out[..., 10:14][has].sigmoid() - t["box"][has]).abs().mean().item() * cfg.image_size
            history.append({"stage": "vision", "step": step + 1, "loss": round(loss.item(), 4),
                            "box_err_px": round(box_err, 2), "elapsed_s": round(time.time() - t0, 1)})
            print(f"vision pretrain {history[-1]}", file=sys.stderr, flush=True)
    return history


def build_data(data: Path, n_train: int, n_val: int, n_test: int) -> dict[str, str]:
    """JSONL + PNGs of each split under `data`, written unless already there with the same sizes."""
    paths = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        path = data / f"{split}.jsonl"
        if not path.is_file() or sum(1 for _ in open(path)) == 0 or _n_scenes(path) != n:
            synthetic.write_jsonl(str(data), split, n, size=IMAGE_SIZE)
        paths[split] = str(path)
    return paths


def _n_scenes(path: Path) -> int:
    return len({json.loads(line)["image"] for line in open(path)})


def build_tokenizer(directory: Path) -> GemmaTokenizer:
    from .tokenizer_train import train_tokenizer

    texts = synthetic.corpus_texts()
    tok = GemmaTokenizer(train_tokenizer(texts, BASE_VOCAB))
    return tok


def write_model_card(out: Path, config: dict, cmd: str, res: dict, train_s: float, cfg: TrainConfig,
                     n_params: int, n_train: int, history: list, vision_steps: int = 0,
                     vision_s: float = 0.0) -> None:
    status = meets_targets(res)
    rows = "\n".join(f"| {k} | {res[k]:.4f} | >= {TARGETS[k]} | {'met' if status[k] else 'MISSED'} |"
                     for k in TARGETS)
    t, v = config["text_config"], config["vision_config"]
    card = f"""# shapes-tiny

A {n_params / 1e6:.2f} M-parameter PaliGemma (PaliGemma-1 layout: SigLIP vision tower + linear
projector + Gemma decoder) trained **from random initialisation** by this
project, on CPU, on synthetic scenes of 1-3 coloured circles, squares and triangles
(`paligemma/synthetic.py`). It is the package's default model so that everything runs offline.

**It knows nothing but these shapes.** On any other image it produces confident nonsense about
red circles and blue squares. For real images load an official checkpoint.

## What it answers
| prompt | example answer |
|---|---|
| `caption en` | `a red circle and an orange square` (left to right) |
| `answer en how many shapes?` | `2` |
| `detect circle` / `detect square` / `detect triangle` | `<loc0144><loc0304><loc0400><loc0559> circle ; ...` |

Images are {v['image_size']}x{v['image_size']} ({v['image_size'] // v['patch_size']}x{v['image_size'] // v['patch_size']} patches of {v['patch_size']} px); larger
images are resized, so shapes must stay large relative to the image. Colours: {", ".join(synthetic.COLORS)}.

## Test figures ({res['n_scenes']} held-out test scenes, greedy decoding)
| metric | value | target | |
|---|---|---|---|
{rows}
| absent-kind `detect` returns nothing | {res['absent_acc']:.4f} | | |

`detect_miou`: mean IoU over ground-truth objects after greedy IoU matching (a missed object scores 0).
`detect_count_acc`: share of `detect <kind>` queries returning exactly the right number of boxes.
Reproduce with `python -m paligemma.shapes.evaluate paligemma/assets/shapes-tiny --n 500`.

## Architecture
| | vision (SigLIP) | text (Gemma) |
|---|---|---|
| width | {v['hidden_size']} | {t['hidden_size']} |
| layers | {v['num_hidden_layers']} | {t['num_hidden_layers']} |
| heads | {v['num_attention_heads']} | {t['num_attention_heads']} ({t['num_key_value_heads']} KV heads, head_dim {t['head_dim']}) |
| MLP | {v['intermediate_size']} | {t['intermediate_size']} |

Vocabulary: {config['vocab_size']} rows (a {BASE_VOCAB}-entry BPE trained on the task's words, then
`<loc0000>`..`<loc1023>`, `<seg000>`..`<seg127>`, `<image>` id {config['image_token_index']}).
Initialisation (`shapes.recipe.init_for_shapes`): LeCun-normal matrices (N(0, 1/fan_in)),
N(0, 1/H) embeddings, a 2-D sin/cos code in the vision position embeddings and a 1-D sin/cos code
of the bin index in the `<loc>` embeddings. Multi-head rather than multi-query attention in the
decoder: at width {t['hidden_size']} a single 32-dim KV head starves the image-to-text path.

## Training
```
{cmd}
```
{n_train} training scenes (each gives a caption, a count, one `detect` per present kind and one
`detect` of an absent kind). Stage 1 ({vision_steps} steps, {vision_s / 60:.1f} min): the vision
tower alone, with a throw-away linear head, on dense per-patch targets of the same training scenes
(objectness, colour, kind, box of the shape centred in the patch; box coverage per colour and kind),
`shapes.recipe.pretrain_vision`. Stage 2: the whole model on the PaliGemma loss, {cfg.steps} steps of batch {cfg.batch_size * cfg.grad_accum}, AdamW
lr {cfg.lr} (warmup {cfg.warmup}, cosine to {cfg.min_lr_ratio} x), weight decay {cfg.weight_decay},
grad-norm clip {cfg.max_grad_norm}, fp32, seed {cfg.seed}.
Training took **{train_s / 60:.1f} min** (both stages) with {torch.get_num_threads()} torch thread(s) on a
{os.cpu_count()}-core {platform.machine()} CPU shared with other work, torch {torch.__version__}. Final train loss {_last(history, 'loss')}, val loss
{_last(history, 'val_loss')}.
"""
    (out / "MODEL_CARD.md").write_text(card)


def _last(history: list, key: str):
    vals = [h[key] for h in history if key in h]
    return f"{vals[-1]:.4f}" if vals else "n/a"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m paligemma.shapes.recipe", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="paligemma/assets/shapes-tiny")
    p.add_argument("--work", default="runs/shapes", help="data, checkpoint and log directory")
    p.add_argument("--data", help="where the generated data goes (default WORK/data)")
    p.add_argument("--patch", type=int, default=PATCH, help="vision patch size in px (64 px images)")
    p.add_argument("--n-train", type=int, default=20000, help="training scenes")
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vision-width", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=0, help="decoder KV heads (0 = one per head)")
    p.add_argument("--vision-steps", type=int, default=800, help="stage-1 dense vision pretraining steps")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine; 0 = torch default)")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    paths = build_data(Path(args.data) if args.data else work / "data", args.n_train, args.n_val,
                       args.n_test)
    tok = build_tokenizer(work)
    loc_start = tok.token_to_id("<loc0000>")
    vocab = -(-len(tok) // 64) * 64                                   # pad rows to a multiple of 64, as HF
    config_dict = shapes_config(tok.image_id, vocab, args.width, args.layers, args.vision_width,
                                args.vision_layers, args.patch, args.kv_heads)
    config = PaliGemmaConfig.from_dict(config_dict)
    torch.manual_seed(args.seed)
    model = PaliGemmaForConditionalGeneration(config)
    init_for_shapes(model, loc_start)
    processor = PaliGemmaProcessor(tok, image_size=IMAGE_SIZE, num_image_tokens=config.num_image_tokens)
    n_params = sum(q.numel() for q in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters; vocab {len(tok)} (+pad to {vocab}); "
          f"data ready in {time.time() - t_start:.0f} s", file=sys.stderr, flush=True)

    t_vision = time.time()
    if args.vision_steps and not args.resume:
        pretrain_vision(model, synthetic.split_seeds("train", args.n_train), args.vision_steps,
                        args.batch_size, args.lr, args.seed)
    vision_s = time.time() - t_vision
    cache: dict = {}
    train_rows = load_jsonl(paths["train"], cache)
    val_rows = load_jsonl(paths["val"], cache)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                      min_lr_ratio=0.02, weight_decay=0.0, max_grad_norm=1.0,
                      eval_every=args.eval_every, eval_batches=4, save_every=args.eval_every,
                      log_every=20, seed=args.seed, progress=False)
    eval_fn = lambda m, pr: {k: v for k, v in evaluate(m, pr, n=60, split="val").items()  # noqa: E731
                             if k in TARGETS or k == "absent_acc"}
    t0 = time.time()
    history = train(model, processor, train_rows, cfg, val_rows, out_dir=str(work), eval_fn=eval_fn,
                    resume=args.resume, log_file=str(work / "train_log.jsonl"))
    train_s = time.time() - t0 + vision_s

    res = evaluate(model, processor, n=args.n_test, split="test")
    print(json.dumps(res), file=sys.stderr, flush=True)
    from ..loading import save_pretrained
    save_pretrained(model, processor, out)
    cmd = "python -m paligemma.shapes.recipe " + " ".join(argv if argv is not None else sys.argv[1:])
    write_model_card(out, config_dict, cmd.strip(), res, train_s, cfg, n_params, args.n_train, history,
                     args.vision_steps, vision_s)
    (work / "test_results.json").write_text(json.dumps({**res, "train_seconds": round(train_s, 1)}, indent=1))
    print(f"wrote {out} in {(time.time() - t_start) / 60:.1f} min total", file=sys.stderr)
    return 0 if all(meets_targets(res).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
