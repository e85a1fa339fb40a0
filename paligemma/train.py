"""Fine-tuning (or training from scratch) on JSONL `{"image", "prefix", "suffix"}` examples.

The recipe follows the PaliGemma transfer setup of big_vision (`trainers/proj/paligemma/train.py`,
`configs/proj/paligemma/transfers/*.py`) and the HF fine-tuning tutorial:

* the processor builds `input_ids` / `token_type_ids` / `labels` from prefix + suffix; labels are
  -100 everywhere except the suffix and its `<eos>` (DESIGN.md, processor), and the model's
  forward returns the shifted cross-entropy, a mean over supervised tokens (HF's token weighting);
* AdamW, linear warmup then cosine decay, gradient accumulation, global grad-norm clipping;
* freeze options: `vision`, `projector`, `llm`, `embeddings`, and big_vision's "attention-only"
  transfer (`llm-attn-only`: only the decoder's attention projections train);
* gradient checkpointing (every module with a `gradient_checkpointing` flag), bf16 autocast on a GPU,
  fp32 on the CPU;
* periodic evaluation (held-out loss + an optional task-metric callback), resumable checkpoints
  holding model, optimizer, scheduler, step and RNG states; the final model is written with
  `paligemma.save_pretrained` in the hub layout.

`train_main(argv)` is the `paligemma train ...` command line.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .cpu.formats import weight_format
from .errors import InputError
from .images import load_image, to_rgb

FREEZE_CHOICES = ("vision", "projector", "llm", "embeddings", "llm-attn-only")
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Optimisation settings. Defaults suit fine-tuning a small model on a few thousand examples."""

    steps: int = 1000                 # optimizer steps (each = batch_size * grad_accum examples)
    batch_size: int = 16              # examples per forward pass
    grad_accum: int = 1               # forward passes per optimizer step
    lr: float = 3e-4                  # peak learning rate, reached after `warmup` steps
    min_lr_ratio: float = 0.0         # cosine decays to lr * min_lr_ratio
    warmup: int = 100                 # linear warmup steps
    weight_decay: float = 0.0         # decoupled; only on >= 2-D weights (not norms, biases)
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0        # global L2 clip; 0 disables
    freeze: tuple[str, ...] = ()      # subset of FREEZE_CHOICES
    gradient_checkpointing: bool = False
    precision: str = "auto"           # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "bf16" | "fp32"
    eval_every: int = 0               # steps between evaluations; 0 = only at the end
    eval_batches: int = 8             # val batches per loss evaluation (0 = all)
    save_every: int = 0               # steps between resumable checkpoints; 0 = only at the end
    log_every: int = 10
    seed: int = 0
    progress: bool = True             # a progress bar on stderr

    def __post_init__(self):
        bad = [f for f in self.freeze if f not in FREEZE_CHOICES]
        if bad:
            raise InputError(f"unknown --freeze {bad}; choose from {FREEZE_CHOICES}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise InputError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise InputError("steps, batch_size and grad_accum must be >= 1")


# ------------------------------------------------------------------------------------------ data
@dataclass
class Example:
    image: Image.Image
    prefix: str
    suffix: str


def load_jsonl(path: str, cache: dict | None = None) -> list[Example]:
    """Read `{"image", "prefix", "suffix"}` lines; images resolve against the file's directory and are
    decoded once (scenes shared by several lines share one `PIL.Image`)."""
    if not os.path.isfile(path):
        raise InputError(f"no such JSONL file: {path}")
    root = os.path.dirname(os.path.abspath(path))
    cache = {} if cache is None else cache
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{i + 1}: not JSON ({e})") from None
            missing = [k for k in ("image", "prefix", "suffix") if k not in row]
            if missing:
                raise InputError(f"{path}:{i + 1}: missing {missing}; each line needs "
                                 '{"image": path, "prefix": str, "suffix": str}')
            img_path = row["image"] if os.path.isabs(row["image"]) else os.path.join(root, row["image"])
            if img_path not in cache:
                try:
                    cache[img_path] = to_rgb(load_image(img_path))  # as the processor sees it at inference
                except InputError as e:
                    raise InputError(f"{path}:{i + 1}: {e}") from None
            out.append(Example(cache[img_path], row["prefix"], row["suffix"]))
    if not out:
        raise InputError(f"{path} holds no examples")
    return out


def collate(processor, examples: Sequence[Example], with_labels: bool = True) -> dict:
    """Processor batch for `examples`: prefix as text, suffix as the supervised continuation."""
    batch = processor(text=[e.prefix for e in examples], images=[e.image for e in examples],
                      suffix=[e.suffix for e in examples] if with_labels else None)
    return dict(batch)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a function of (seed, epoch) only, so a resumed run sees the
    same stream without storing iterator state."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batch_indices(n: int, batch_size: int, seed: int, index: int) -> list[int]:
    """Indices of micro-batch number `index` of the endless, epoch-shuffled stream over n examples."""
    out, pos = [], index * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        order = epoch_order(n, seed, epoch)
        take = min(batch_size - len(out), n - offset)
        out += order[offset:offset + take]
        pos += take
    return out


# ------------------------------------------------------------------------------------------ model
def apply_freeze(model: torch.nn.Module, freeze: Sequence[str]) -> dict[str, int]:
    """Set `requires_grad` by part; returns trainable / frozen parameter counts.

    Parts are found by parameter name: `vision_tower` ("vision"), `multi_modal_projector`
    ("projector"), the tied token embedding / lm_head ("embeddings") and the rest of
    `language_model` ("llm"). "llm" also freezes the embeddings. "llm-attn-only" is big_vision's
    attention-only transfer: in the decoder only `self_attn` projections train (embeddings and
    norms and MLPs are frozen); combine it with "vision" / "projector" to freeze those too.
    """
    for name, p in model.named_parameters():
        part = _part_of(name)
        frozen = part in freeze
        if part == "embeddings" and ("llm" in freeze or "llm-attn-only" in freeze):
            frozen = True
        if part == "llm" and "llm-attn-only" in freeze and "self_attn" not in name:
            frozen = True
        p.requires_grad_(not frozen)
    counts = {"trainable": 0, "frozen": 0}
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
    return counts


def _part_of(name: str) -> str:
    if "vision_tower" in name:
        return "vision"
    if "multi_modal_projector" in name:
        return "projector"
    if "embed_tokens" in name or "lm_head" in name:
        return "embeddings"
    if "language_model" in name:
        return "llm"
    raise InputError(f"parameter {name!r} belongs to no known part (vision_tower, multi_modal_projector, "
                     "language_model); freeze options cannot classify it")


def set_gradient_checkpointing(model: torch.nn.Module, enabled: bool = True) -> int:
    """Turn on activation checkpointing in every module that supports it; returns how many did."""
    n = 0
    for m in model.modules():
        if hasattr(m, "gradient_checkpointing"):
            m.gradient_checkpointing = enabled
            n += 1
    return n


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **fused)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to `min_lr_ratio` at `steps`."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def _autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA by default; fp32 on the CPU unless precision="bf16" asks for it."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def _loss_kwargs(model) -> dict:
    """Skip the full [B, T, V] logits when only the loss is needed (257k-wide for real checkpoints)."""
    return {"return_logits": False} if "return_logits" in inspect.signature(model.forward).parameters else {}


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# ------------------------------------------------------------------------------------------ eval
@torch.no_grad()
def evaluate_loss(model, processor, examples: Sequence[Example], batch_size: int,
                  max_batches: int = 0, precision: str = "auto") -> float:
    """Mean cross-entropy per supervised token over `examples` (first `max_batches` batches)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b, start in enumerate(range(0, len(examples), batch_size)):
        if max_batches and b >= max_batches:
            break
        batch = _to(collate(processor, examples[start:start + batch_size]), device)
        with _autocast(device, precision):
            loss = model(**batch, **_loss_kwargs(model)).loss
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


# ------------------------------------------------------------------------------------------ checkpoints
def _rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),  # plain tuples and tensors only: loadable with weights_only=True
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, model, optimizer, scheduler, step: int, cfg: TrainConfig,
                    history: list) -> None:
    """Everything needed to continue: model, optimizer, scheduler, step, RNG, the run's settings."""
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "rng": _rng_state(),
                "train_config": asdict(cfg), "history": history}, tmp)
    os.replace(tmp, path)   # never leave a half-written checkpoint behind


def load_checkpoint(path: str, model, optimizer, scheduler) -> tuple[int, list]:
    if not os.path.isfile(path):
        raise InputError(f"--resume: no checkpoint at {path}")
    try:  # weights_only: a checkpoint file can never run code when it is loaded
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise InputError(f"--resume: {path} is not a readable training checkpoint ({e.__class__.__name__})") from None
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    _set_rng_state(ck["rng"])
    return int(ck["step"]), list(ck.get("history", []))


# ------------------------------------------------------------------------------------------ loop
class _Progress:
    """tqdm if installed, else a line every `log_every` steps."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train")
            except ImportError:
                pass

    def update(self, step: int, info: dict, log: bool) -> None:
        text = " ".join(f"{k}={v}" for k, v in info.items())
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif log:
            print(f"step {step} {text}", file=sys.stderr, flush=True)

    def write(self, msg: str) -> None:
        (self.bar.write if self.bar is not None else lambda m: print(m, file=sys.stderr, flush=True))(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(model, processor, train_examples: Sequence[Example], cfg: TrainConfig,
          val_examples: Sequence[Example] | None = None, out_dir: str | None = None,
          eval_fn: Callable[[object, object], dict] | None = None, resume: bool = False,
          log_file: str | None = None) -> list[dict]:
    """Train `model` in place. Returns the history: one dict per log / eval point.

    `eval_fn(model, processor) -> dict of metrics` runs with the model in eval mode at every
    evaluation. With `out_dir`, a resumable `checkpoint.pt` is written every `save_every` steps and
    at the end, and `resume=True` continues from it (same data stream, same RNG).
    """
    fmt = weight_format(model)
    if fmt is not None:  # fast formats hold weights as buffers: nothing to train there
        raise InputError(f"the model holds its weights in the fast inference format {fmt!r}; "
                         "load it with quantize=None to fine-tune")
    device = next(model.parameters()).device
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    apply_freeze(model, cfg.freeze)
    if cfg.gradient_checkpointing and set_gradient_checkpointing(model, True) == 0:
        raise InputError("--gradient-checkpointing: this model exposes no `gradient_checkpointing` flag")
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    step, history = 0, []
    ckpt = os.path.join(out_dir, CHECKPOINT_FILE) if out_dir else None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    if resume:
        if ckpt is None:
            raise InputError("resume needs an output directory holding checkpoint.pt")
        step, history = load_checkpoint(ckpt, model, optimizer, scheduler)
    logf = open(log_file, "a") if log_file else None

    def record(entry: dict) -> None:
        history.append(entry)
        if logf:
            logf.write(json.dumps(entry) + "\n")
            logf.flush()

    def run_eval(at: int) -> dict:
        entry: dict = {"step": at}
        if val_examples:
            entry["val_loss"] = round(evaluate_loss(model, processor, val_examples, cfg.batch_size,
                                                    cfg.eval_batches, cfg.precision), 5)
        if eval_fn is not None:
            was = model.training
            model.eval()
            entry.update(eval_fn(model, processor))
            model.train(was)
        record(entry)
        return entry

    model.train()
    bar = _Progress(cfg.steps, step, cfg.progress)
    t0, seen0, done_examples = time.time(), step, 0
    n = len(train_examples)
    while step < cfg.steps:
        optimizer.zero_grad(set_to_none=True)
        total_loss = 0.0
        for micro in range(cfg.grad_accum):
            idx = batch_indices(n, cfg.batch_size, cfg.seed, step * cfg.grad_accum + micro)
            batch = _to(collate(processor, [train_examples[i] for i in idx]), device)
            with _autocast(device, cfg.precision):
                loss = model(**batch, **_loss_kwargs(model)).loss / cfg.grad_accum
            loss.backward()
            total_loss += float(loss.detach())
        params = [p for g in optimizer.param_groups for p in g["params"]]
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")))
        optimizer.step()
        scheduler.step()
        step += 1
        done_examples += cfg.batch_size * cfg.grad_accum
        rate = done_examples / max(time.time() - t0, 1e-9)
        log = step % cfg.log_every == 0 or step == cfg.steps
        bar.update(step, {"loss": f"{total_loss:.4f}", "lr": f"{scheduler.get_last_lr()[0]:.2e}",
                          "ex/s": f"{rate:.1f}"}, log)
        if log:
            record({"step": step, "loss": round(total_loss, 5), "grad_norm": round(gnorm, 4),
                    "lr": scheduler.get_last_lr()[0], "examples_per_s": round(rate, 2),
                    "elapsed_s": round(time.time() - t0, 1)})
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            bar.write(f"eval @ {step}: {run_eval(step)}")
        if ckpt and cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            save_checkpoint(ckpt, model, optimizer, scheduler, step, cfg, history)
    bar.close()
    if step > seen0 or not history or "val_loss" not in history[-1]:
        final = run_eval(step)
        print(f"final eval @ {step}: {final}", file=sys.stderr, flush=True)
    if ckpt:
        save_checkpoint(ckpt, model, optimizer, scheduler, step, cfg, history)
    if logf:
        logf.close()
    return history


# ------------------------------------------------------------------------------------------ building
def build_from_config(config_path: str, tokenizer_path: str, dtype=torch.float32, device="cpu"):
    """A randomly initialised model from a config.json, with a processor over `tokenizer_path`."""
    from .config import PaliGemmaConfig
    from .modeling_paligemma import PaliGemmaForConditionalGeneration
    from .processing_paligemma import PaliGemmaProcessor
    from .tokenizer import GemmaTokenizer

    config = PaliGemmaConfig.from_file(config_path)
    tok = GemmaTokenizer.from_file(tokenizer_path)
    if len(tok) > config.vocab_size:
        raise InputError(f"tokenizer has {len(tok)} tokens but the config's vocab_size is "
                         f"{config.vocab_size}; raise text_config.vocab_size")
    if tok.image_id != config.image_token_index:
        raise InputError(f"tokenizer's <image> id is {tok.image_id} but config.image_token_index is "
                         f"{config.image_token_index}; make them agree")
    model = PaliGemmaForConditionalGeneration(config).to(device=device, dtype=dtype)
    processor = PaliGemmaProcessor(tok, image_size=config.vision.image_size,
                                   num_image_tokens=config.num_image_tokens)
    return model, processor


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="paligemma train", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory to start from (hub layout)")
    src.add_argument("--init-config", help="config.json for a randomly initialised model (needs --tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer.json or its directory (with --init-config)")
    p.add_argument("--data", required=True, help="train JSONL: {image, prefix, suffix} per line")
    p.add_argument("--val", help="validation JSONL (same format)")
    p.add_argument("--out", required=True, help="output directory: final model + checkpoint.pt + log")
    d = TrainConfig()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    p.add_argument("--freeze", nargs="*", default=[], choices=FREEZE_CHOICES)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--precision", default=d.precision, choices=("auto", "bf16", "fp32"))
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-batches", type=int, default=d.eval_batches)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


def train_main(argv: Sequence[str] | None = None) -> int:
    """`paligemma train ...`: fine-tune --model (or train --init-config from scratch) on --data."""
    args = _parser().parse_args(argv)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup,
                      weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                      freeze=tuple(args.freeze), gradient_checkpointing=args.gradient_checkpointing,
                      precision=args.precision, eval_every=args.eval_every,
                      eval_batches=args.eval_batches, save_every=args.save_every,
                      log_every=args.log_every, seed=args.seed, progress=not args.no_progress)
    torch.manual_seed(args.seed)   # the random init of --init-config depends on the seed
    if args.model:
        from .loading import load
        model, processor = load(args.model, dtype=torch.float32, device=args.device, quantize=None)  # trainable fp32
    else:
        if not args.tokenizer:
            raise InputError("--init-config needs --tokenizer (a tokenizer.json or its directory)")
        model, processor = build_from_config(args.init_config, args.tokenizer, device=args.device)
    train_rows = load_jsonl(args.data)
    val_rows = load_jsonl(args.val) if args.val else None
    train(model, processor, train_rows, cfg, val_rows, out_dir=args.out, resume=args.resume,
          log_file=os.path.join(args.out, "train_log.jsonl"))
    from .loading import save_pretrained
    save_pretrained(model, processor, args.out)
    print(f"saved model to {args.out}", file=sys.stderr)
    return 0
