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
* LoRA (`lora_rank` > 0, `lora.py`): only the adapter trains (and holds optimizer state), over a frozen
  base kept in fp32, bf16 or int8 (`base_format`); checkpoints then hold the adapter only, and the result
  is saved in PEFT's layout (with `--merge`, also a full checkpoint with the adapter folded in);
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
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .allocator import return_freed_memory
from .cpu.formats import weight_format
from .atomic import atomic_file
from .checks import finite_number, regular_file, valid_text, whole_number
from .errors import InputError, PaliGemmaError
from .images import load_image, to_rgb

FREEZE_CHOICES = ("vision", "projector", "llm", "embeddings", "llm-attn-only")
BASE_FORMATS = (None, "bf16", "int8")  # how a LoRA run holds the frozen base (None: plain modules in fp32)
CHECKPOINT_FILE = "checkpoint.pt"
MERGED_DIR = "merged"  # OUT/merged: the --merge checkpoint


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
    lora_rank: int = 0                # > 0: train a LoRA adapter of this rank over a frozen base
    lora_alpha: float | None = None   # adapter scale alpha / rank; None = 2 * rank
    lora_dropout: float = 0.0         # dropout on the adapter's input
    lora_targets: tuple[str, ...] = ("all-linear",)   # see lora.LoRAConfig: attn, mlp, q_proj, ..., vision, projector
    base_format: str | None = None    # the frozen base's storage with LoRA: None (fp32), "bf16" or "int8"

    def __post_init__(self):
        """Every setting checked up front (type, finite, range), so a bad flag fails before any loading."""
        bad = [f for f in self.freeze if f not in FREEZE_CHOICES]
        if bad:
            raise InputError(f"unknown --freeze {bad}; choose from {FREEZE_CHOICES}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise InputError(f"--precision must be auto, bf16 or fp32, got {self.precision!r}")
        big = 1 << 40
        for name, lo in [("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("warmup", 0), ("eval_every", 0),
                         ("eval_batches", 0), ("save_every", 0), ("log_every", 1)]:
            whole_number(f"--{name.replace('_', '-')}", getattr(self, name), lo, big, InputError)
        finite_number("--lr", self.lr, 0.0, 1.0, lo_open=True, error=InputError)
        finite_number("--min-lr-ratio", self.min_lr_ratio, 0.0, 1.0, error=InputError)
        finite_number("--weight-decay", self.weight_decay, 0.0, 10.0, error=InputError)
        if self.lr * self.weight_decay >= 1:  # AdamW scales weights by (1 - lr * wd) every step
            raise InputError(f"--lr {self.lr:g} x --weight-decay {self.weight_decay:g} >= 1 would wipe the weights "
                             "at every step; lower one of them")
        finite_number("--max-grad-norm", self.max_grad_norm, 0.0, error=InputError)
        if len(self.betas) != 2:
            raise InputError(f"betas={self.betas!r}; expected two numbers in [0, 1)")
        for b in self.betas:
            finite_number("betas", b, 0.0, 1.0, error=InputError)
            if b >= 1:
                raise InputError(f"betas={self.betas!r}; expected two numbers in [0, 1)")
        self.seed = whole_number("--seed", self.seed, -(1 << 4096), 1 << 4096, InputError) % 2**64
        if self.base_format not in BASE_FORMATS:
            raise InputError(f"base_format must be None, bf16 or int8, got {self.base_format!r}")
        if self.lora_rank:
            self.lora_targets = self.lora_config().targets
            if self.freeze:
                raise InputError("--freeze does not combine with LoRA: the whole base is frozen and only the adapter "
                                 "trains; drop --freeze (choose the adapted layers with --lora-targets)")
        elif self.base_format is not None:
            raise InputError(f"base_format={self.base_format!r} holds frozen weights that only a LoRA adapter can "
                             "train over; set lora_rank (--lora-rank R)")

    def lora_config(self):
        from .lora import LoRAConfig

        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=self.lora_targets)


class TrainingDiverged(PaliGemmaError):
    """The loss or the gradients became NaN / inf: the run stops; nothing non-finite is saved."""


# ------------------------------------------------------------------------------------------ data
@dataclass
class Example:
    image: Image.Image
    prefix: str
    suffix: str
    source: str = "example"  # file:line, named in errors


def load_jsonl(path: str, cache: dict | None = None) -> list[Example]:
    """Read `{"image", "prefix", "suffix"}` lines; images resolve against the file's directory and are
    decoded once (scenes shared by several lines share one `PIL.Image`). Each line must be UTF-8 JSON
    holding an object with string fields and valid Unicode; errors name the file and the line."""
    regular_file(path, "JSONL file", InputError)
    root = os.path.dirname(os.path.abspath(path))
    cache = {} if cache is None else cache
    out = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            where = f"{path}:{i + 1}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: not valid UTF-8 (byte {e.start} of the line); save the file as UTF-8") from None
            if not line.strip():
                continue
            row = _row(line, where)
            img_path = row["image"] if os.path.isabs(row["image"]) else os.path.join(root, row["image"])
            if img_path not in cache:
                try:
                    cache[img_path] = to_rgb(load_image(img_path))  # as the processor sees it at inference
                except InputError as e:
                    raise InputError(f"{where}: {e}") from None
            out.append(Example(cache[img_path], row["prefix"], row["suffix"], where))
    if not out:
        raise InputError(f"{path} holds no examples")
    return out


def _row(line: str, where: str) -> dict:
    """One JSONL line: an object whose image, prefix and suffix are strings of valid Unicode."""
    try:
        row = json.loads(line, parse_constant=lambda c: c)
    except (ValueError, RecursionError) as e:
        raise InputError(f"{where}: not JSON ({e})") from None
    if not isinstance(row, dict):
        raise InputError(f"{where}: a JSON {type(row).__name__}, expected an object "
                         '{"image": path, "prefix": str, "suffix": str}')
    missing = [k for k in ("image", "prefix", "suffix") if k not in row]
    if missing:
        raise InputError(f"{where}: missing {missing}; each line needs "
                         '{"image": path, "prefix": str, "suffix": str}')
    for key in ("image", "prefix", "suffix"):
        if not isinstance(row[key], str):
            raise InputError(f"{where}: {key}={repr(row[key])[:40]} is a {type(row[key]).__name__}, expected a string")
        valid_text(f"{where}: {key}", row[key], InputError)
    if not row["image"]:
        raise InputError(f"{where}: image is empty; give the image's path")
    return row


def check_lengths(processor, examples: Sequence[Example], context: int, what: str = "training") -> None:
    """Refuse examples whose prompt + suffix + <eos> exceed the model's context (they would train on
    positions it never saw); the error counts them and names the longest one's line."""
    tok = processor.tokenizer
    lengths = [len(tok.encode(processor.build_prompt(e.prefix, 1))) + len(tok.encode(e.suffix)) + 1
               for e in examples]
    over = [i for i, n in enumerate(lengths) if n > context]
    if over:
        worst = max(over, key=lambda i: lengths[i])
        raise InputError(f"{len(over)} of {len(examples)} {what} examples are longer than the model's context of "
                         f"{context} tokens (image tokens included; the longest, {examples[worst].source}, has "
                         f"{lengths[worst]}); shorten their prefix or suffix")


def collate(processor, examples: Sequence[Example], with_labels: bool = True) -> dict:
    """Processor batch for `examples`: prefix as text, suffix as the supervised continuation."""
    batch = processor(text=[e.prefix for e in examples], images=[e.image for e in examples],
                      suffix=[e.suffix for e in examples] if with_labels else None)
    return dict(batch)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a function of (seed, epoch) only, so a resumed run sees the
    same stream without storing iterator state."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)
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
    if counts["trainable"] == 0:
        raise InputError(f"--freeze {' '.join(freeze)} freezes every parameter: nothing would train; "
                         "leave at least one part trainable")
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


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "step", "rng")


def save_checkpoint(path: str, model, optimizer, scheduler, step: int, cfg: TrainConfig,
                    history: list) -> None:
    """Everything needed to continue: model, optimizer, scheduler, step, RNG, the run's settings. Written
    atomically (`atomic.py`: a unique temporary file, fsynced, renamed over the old one), never with
    non-finite weights."""
    from .loading import _check_finite_model

    _check_finite_model(model)
    weights = {"adapter": trainable_state(model)} if has_lora(model) else {"model": model.state_dict()}
    state = {**weights, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "step": step, "rng": _rng_state(),
             "train_config": asdict(cfg), "history": history}
    atomic_file(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str, model, optimizer, scheduler) -> tuple[int, list]:
    regular_file(path, "--resume checkpoint", InputError)
    try:  # weights_only: a checkpoint file can never run code when it is loaded
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise InputError(f"--resume: {path} is not a readable training checkpoint ({e.__class__.__name__})") from None
    lora_run = has_lora(model)  # a LoRA run's checkpoint holds the adapter in place of the model
    keys = ("adapter", *CHECKPOINT_KEYS[1:]) if lora_run else CHECKPOINT_KEYS
    missing = [k for k in keys if not isinstance(ck, dict) or k not in ck]
    if missing and isinstance(ck, dict) and keys[0] in missing and ("model" if lora_run else "adapter") in ck:
        raise InputError(f"--resume: {path} was written by a {'full fine-tuning' if lora_run else 'LoRA'} run; "
                         "resume it with the same settings (--lora-rank ...)")
    if missing:
        raise InputError(f"--resume: {path} lacks {', '.join(missing)}; it is not a checkpoint written by "
                         "`paligemma train`")
    state = ck["adapter" if lora_run else "model"]
    if not isinstance(state, dict):
        raise InputError(f"--resume: {path}: {keys[0]!r} is a {type(state).__name__}, expected a state dict")
    if lora_run:
        load_trainable_state(model, state, path)
    else:
        _check_same_model(model.state_dict(), state, path)
    try:
        if not lora_run:
            model.load_state_dict(state)
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        _set_rng_state(ck["rng"])
        step = whole_number("step", ck["step"], 0, 1 << 40, InputError)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise InputError(f"--resume: {path} does not match this run's model or settings "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    return step, list(ck.get("history", []))


def _check_same_model(own: dict, state: dict, path: str) -> None:
    absent, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and getattr(state[k], "shape", None) != own[k].shape]
    if absent or extra or shapes:
        detail = "; ".join(part for part in [
            f"missing {len(absent)} tensor(s), e.g. {absent[0]}" if absent else "",
            f"{len(extra)} unknown tensor(s), e.g. {extra[0]}" if extra else "",
            f"{len(shapes)} of another shape, e.g. {shapes[0]}" if shapes else ""] if part)
        raise InputError(f"--resume: {path} is from another model ({detail}); resume with the model it was "
                         "trained from, or start a new --out directory")


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The parameters that train (a LoRA run's adapter), by name."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model, state: dict, path: str) -> None:
    """Copy a checkpoint's adapter into the model's; every tensor must match in name and shape."""
    own = dict(model.named_parameters())
    wanted = {n for n, p in own.items() if p.requires_grad}
    bad = sorted(set(state) ^ wanted) or [n for n in state if getattr(state[n], "shape", None) != own[n].shape]
    if bad:
        raise InputError(f"--resume: the adapter in {path} does not match this run's LoRA layers (first: {bad[0]}); "
                         "resume with the --lora-rank/--lora-targets of the run that wrote it")
    for n, t in state.items():
        own[n].copy_(t)


def prepare_model(model, cfg: TrainConfig) -> None:
    """Set what trains: a LoRA adapter over the frozen base (applied here unless the model holds one), or
    the parts `cfg.freeze` leaves. A base held in a fast inference format trains only under LoRA."""
    from .lora import apply_lora, lora_layers

    layers = lora_layers(model)
    if cfg.lora_rank and not layers:
        apply_lora(model, cfg)
    elif cfg.lora_rank:
        ranks = {m.rank for m in layers.values()}
        if ranks != {cfg.lora_rank}:
            raise InputError(f"the model holds LoRA layers of rank {sorted(ranks)} but lora_rank={cfg.lora_rank}")
        for n, p in model.named_parameters():
            p.requires_grad_(".lora_" in n)
    elif layers:
        raise InputError("the model holds LoRA layers; set lora_rank to train them (or merge_lora it first)")
    else:
        fmt = weight_format(model)
        if fmt is not None:  # fast formats hold weights as buffers: nothing to train there
            raise InputError(f"the model holds its weights in the fast inference format {fmt!r}; load it with "
                             "quantize=None to fine-tune, or train a LoRA adapter over it (lora_rank)")
        apply_freeze(model, cfg.freeze)


def has_lora(model) -> bool:
    from .lora import has_lora as _has_lora

    return _has_lora(model)


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
    device = next(model.parameters()).device
    if device.type == "cpu":
        return_freed_memory()  # activations freed between layers go back to the OS (allocator.py)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    prepare_model(model, cfg)
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

    context = model.config.text.max_position_embeddings
    check_lengths(processor, train_examples, context)
    if val_examples:
        check_lengths(processor, val_examples, context, "validation")
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
        if not (math.isfinite(total_loss) and math.isfinite(gnorm)):
            bar.close()
            if logf:
                logf.close()
            kept = (f"the last checkpoint {ckpt} is kept" if ckpt and os.path.exists(ckpt)
                    else "no checkpoint was written")
            raise TrainingDiverged(f"training diverged at step {step + 1}: loss={total_loss}, grad norm={gnorm}; "
                                   f"stopped before the update, nothing saved ({kept}); lower --lr (now "
                                   f"{cfg.lr:g}) or --weight-decay, or check the data")
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


class _Parser(argparse.ArgumentParser):
    """Flag mistakes become one `error:` line (InputError), not argparse's usage dump."""

    def error(self, message: str):
        raise InputError(f"{message} (see `paligemma train --help`)")


def _check_out(out: str) -> None:
    """--out must be (or become) a writable directory; checked before anything loads."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out} is a file; pass a directory for the model and checkpoints")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {out}: cannot create the directory ({e.strerror or e})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"--out {out} is not writable; choose another directory")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="paligemma train", description=__doc__.split("\n")[0])
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
    lora = p.add_argument_group("LoRA (PEFT-compatible adapters over a frozen base)")
    lora.add_argument("--lora-rank", type=int, default=0, metavar="R", help="train a rank-R adapter instead of the model")
    lora.add_argument("--lora-alpha", type=float, metavar="A", help="adapter scale A / R (default 2 R)")
    lora.add_argument("--lora-dropout", type=float, default=0.0, metavar="P")
    lora.add_argument("--lora-targets", nargs="+", default=["all-linear"], metavar="T",
                      help="attn, mlp, all-linear (default) or decoder layer names (q_proj,v_proj,...), "
                           "plus optionally vision and projector")
    lora.add_argument("--base-format", choices=("bf16", "int8"),
                      help="hold the frozen base in bf16 or int8 (default: fp32 plain modules)")
    lora.add_argument("--merge", action="store_true",
                      help="also write OUT/merged: a full checkpoint (hub layout) with the adapter folded in")
    return p


def load_for_training(path: str, cfg: TrainConfig, device: str = "cpu"):
    """(model, processor) from a checkpoint, held as training with `cfg` needs: fp32 plain modules, or with
    LoRA the base in `cfg.base_format` (on a GPU a bf16 base is plain bf16 modules under autocast)."""
    from .loading import load

    if cfg.base_format == "bf16" and torch.device(device).type == "cuda":
        return load(path, dtype=torch.bfloat16, device=device, quantize=None)
    return load(path, dtype=torch.float32, device=device, quantize=cfg.base_format)


def train_main(argv: Sequence[str] | None = None) -> int:
    """`paligemma train ...`: fine-tune --model (or train --init-config from scratch) on --data."""
    args = _parser().parse_args(argv)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup,
                      weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                      freeze=tuple(args.freeze), gradient_checkpointing=args.gradient_checkpointing,
                      precision=args.precision, eval_every=args.eval_every,
                      eval_batches=args.eval_batches, save_every=args.save_every,
                      log_every=args.log_every, seed=args.seed, progress=not args.no_progress,
                      lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      lora_targets=tuple(args.lora_targets), base_format=args.base_format)
    if args.merge and not cfg.lora_rank:
        raise InputError("--merge folds a LoRA adapter into the base; it needs --lora-rank")
    if args.init_config and cfg.base_format:
        raise InputError("--base-format needs a checkpoint (--model) to hold in that format, not --init-config")
    _check_out(args.out)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    torch.manual_seed(cfg.seed)   # the random init of --init-config depends on the seed
    if args.model:
        model, processor = load_for_training(args.model, cfg, args.device)
    else:
        if not args.tokenizer:
            raise InputError("--init-config needs --tokenizer (a tokenizer.json or its directory)")
        model, processor = build_from_config(args.init_config, args.tokenizer, device=args.device)
    train_rows = load_jsonl(args.data)
    val_rows = load_jsonl(args.val) if args.val else None
    train(model, processor, train_rows, cfg, val_rows, out_dir=args.out, resume=args.resume,
          log_file=os.path.join(args.out, "train_log.jsonl"))
    if cfg.lora_rank:
        save_lora_result(model, processor, args.out, args.model, cfg, args.merge)
        return 0
    from .loading import save_pretrained
    save_pretrained(model, processor, args.out)
    print(f"saved model to {args.out}", file=sys.stderr)
    return 0


def save_lora_result(model, processor, out: str, base: str | None, cfg: TrainConfig, merge: bool) -> None:
    """The adapter into `out` (PEFT's layout); with `merge`, `out/merged` in the hub layout. A plain fp32 base is
    merged in place; a bf16 / int8 one is read again from `base` in its stored precision and merged there, so
    the merged weights are not rounded to the training format."""
    from .lora import merge_lora, save_adapter

    save_adapter(model, out, base_model=str(base) if base else None)
    print(f"saved adapter to {out}", file=sys.stderr)
    if not merge:
        return
    merged = os.path.join(out, MERGED_DIR)
    if cfg.base_format is None:
        from .loading import save_pretrained

        save_pretrained(merge_lora(model), processor, merged)
    else:
        merge_into_checkpoint(base, out, merged)
    print(f"saved merged model to {merged}", file=sys.stderr)


def _stored_dtype(base_dir: str | Path) -> torch.dtype:
    """bf16 when every matrix of the checkpoint is stored in bf16 (Google's), else fp32."""
    from .loading import _open, weight_files

    stored = set()
    for file in weight_files(Path(base_dir)):
        with _open(file) as f:
            stored |= {f.dtype(k) for k in f.entries if len(f.shape(k)) == 2}
    return torch.bfloat16 if stored == {torch.bfloat16} else torch.float32


def merge_into_checkpoint(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write base + adapter, folded, as a full checkpoint in the hub layout (loadable by transformers): the base
    is read as plain modules in its stored precision (bf16 stays bf16), the update added in fp32."""
    from .loading import load, save_pretrained
    from .lora import load_adapter, merge_lora

    if base_dir is None:
        raise InputError("merging needs the base checkpoint directory")
    model, processor = load(base_dir, dtype=_stored_dtype(base_dir), device="cpu", quantize=None)
    save_pretrained(merge_lora(load_adapter(model, adapter_dir)), processor, out_dir)
    return Path(out_dir)
