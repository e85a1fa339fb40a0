"""LoRA adapters over a frozen base, saved and loaded in PEFT's layout.

A `LoRALinear` wraps a frozen linear layer (a plain `nn.Linear`, or a `QuantLinear` of the CPU fast
formats holding bf16 or int8 weights) and adds a trainable low-rank update, as PEFT's `lora.Linear`:

    y = base(x) + B(A(dropout(x))) * alpha / r        A [r, in] (Kaiming-uniform), B [out, r] (zeros)

B starts at zero, so the update adds exactly 0.0 and an adapted model gives the base model's logits bit
for bit until it is trained. Only A and B are parameters that train; the base's weights never get a
gradient (quantized bases pass gradients to their inputs through `cpu/autograd.py`).

Adapters are written as PEFT writes them (`adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.model.<layer>.lora_A.weight` for transformers' `PaliGemmaForConditionalGeneration`),
so `peft.PeftModel.from_pretrained` loads ours and `load_adapter` loads PEFT's (also those made on
transformers 4.x, `base_model.model.language_model.model.layers...`). Anything that would change the
computation and is not supported here (DoRA, per-layer ranks, bias training, ...) is refused by name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, InputError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGET_GROUPS = {"attn": ATTN, "mlp": MLP, "all-linear": ATTN + MLP}
PARTS = {"vision": "vision_tower.", "projector": "multi_modal_projector."}  # extra parts: every linear layer
DECODER = "language_model.layers."
# adapter_config.json fields that would change the computation; accepted only at these (PEFT default) values
UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False, "modules_to_save": None,
               "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
               "exclude_modules": None, "trainable_token_indices": None, "target_parameters": None,
               "use_qalora": False, "layer_replication": None}
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


@dataclass(frozen=True)
class LoRAConfig:
    """rank r, alpha (scale alpha / r; None = 2 r), dropout on the adapter's input, and targets: decoder
    layer names (q_proj, ..., down_proj), groups (attn, mlp, all-linear), and the extra parts "vision"
    (every linear layer of the vision tower) and "projector"."""

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = ("all-linear",)
    use_rslora: bool = False   # scale alpha / sqrt(r) (PEFT's option; read from PEFT adapters)

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise InputError(f"LoRA rank must be a whole number >= 1, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise InputError(f"LoRA alpha must be > 0, got {self.alpha}")
        object.__setattr__(self, "targets", split_targets(self.targets))

    @property
    def lora_alpha(self) -> float:
        return float(2 * self.rank if self.alpha is None else self.alpha)


def split_targets(targets) -> tuple[str, ...]:
    """"q_proj,v_proj" / ["attn", "vision"] -> ("q_proj", "v_proj") / ("attn", "vision"), checked."""
    items = [targets] if isinstance(targets, str) else list(targets)
    out = tuple(t.strip() for item in items for t in str(item).split(",") if t.strip())
    known = set(TARGET_GROUPS) | set(ATTN) | set(MLP) | set(PARTS)
    bad = [t for t in out if t not in known]
    if bad or not out:
        raise InputError(f"unknown LoRA target(s) {bad or targets!r}; use attn, mlp, all-linear, decoder layer names "
                         f"({', '.join(ATTN + MLP)}), comma-separated, plus optionally vision and projector")
    return out


# ------------------------------------------------------------------------------------------ the layer
class LoRALinear(nn.Module):
    """A frozen `base_layer` [out, in] plus the trainable update B @ A * scaling (PEFT's lora.Linear)."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))  # [r, in], fp32
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))  # [out, r], fp32
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and PEFT
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in base_layer.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # [..., out]
        a = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # [..., r]
        return y + (F.linear(a, self.lora_B) * self.scaling).to(y.dtype)  # B = 0 adds exactly 0.0

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense matrix, fp32 [out, in]."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}"


def _is_linear(m: nn.Module) -> bool:
    from .cpu.formats import QuantLinear

    return isinstance(m, (nn.Linear, QuantLinear))


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def resolve_targets(model: nn.Module, targets) -> list[str]:
    """Names of the linear layers `targets` selects (see `LoRAConfig`), in module order."""
    targets = split_targets(targets)
    leaves = {leaf for t in targets for leaf in TARGET_GROUPS.get(t, (t,) if t not in PARTS else ())}
    prefixes = tuple(PARTS[t] for t in targets if t in PARTS)
    names = []
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear) or not _is_linear(m) or name.endswith(".base_layer"):
            continue
        in_decoder = name.startswith(DECODER) and name.rpartition(".")[2] in leaves
        if in_decoder or (prefixes and name.startswith(prefixes)):
            names.append(name)
    if not names:
        raise InputError(f"LoRA targets {targets} select no linear layer of this model")
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def apply_lora(model: nn.Module, cfg) -> dict[str, LoRALinear]:
    """Freeze every weight of `model` and wrap the target layers in `LoRALinear`, in place. `cfg` is a
    `LoRAConfig` or a `train.TrainConfig` (its lora_* fields). Returns the new layers by name."""
    cfg = _as_lora_config(cfg)
    if has_lora(model):
        raise InputError("the model already holds LoRA layers; merge_lora or unload_lora it first")
    names = resolve_targets(model, cfg.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name in names:
        layers[name] = LoRALinear(model.get_submodule(name), cfg.rank, cfg.lora_alpha, cfg.dropout, cfg.use_rslora)
        _replace(model, name, layers[name])
    return layers


def _as_lora_config(cfg) -> LoRAConfig:
    if isinstance(cfg, LoRAConfig):
        return cfg
    return LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets)


def unload_lora(model: nn.Module) -> nn.Module:
    """Put the untouched base layers back (the adapter is dropped, nothing is folded in)."""
    for name, layer in lora_layers(model).items():
        _replace(model, name, layer.base_layer)
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its base weight (W += B @ A * scaling, computed in fp32) and put the plain base
    layer back. Exact up to one rounding for fp32 / bf16 weights; int8 weights are quantized again."""
    from .cpu.formats import quantize_rows

    for name, layer in lora_layers(model).items():
        base = layer.base_layer
        delta = layer.delta_weight().to(base.weight.device)  # [out, in]
        if base.weight.dtype == torch.int8:
            w = base.weight.float() * base.weight_scale[:, None] + delta  # [out, in]
            q, scale = quantize_rows(w)
            base.weight.copy_(q)
            base.weight_scale.copy_(scale)
        else:
            base.weight.copy_(base.weight.float() + delta)
        _replace(model, name, base)
    return model


# ------------------------------------------------------------------------------------------ PEFT files
def peft_key(name: str, which: str) -> str:
    """Our layer name -> PEFT's saved key for transformers 5's PaliGemmaForConditionalGeneration."""
    return f"base_model.model.model.{name}.lora_{which}.weight"


def _our_name(transformers_name: str) -> str:
    """A transformers 4.x or 5.x module name -> ours (`keys.canonical_key` on the weight's key)."""
    from .keys import canonical_key

    return canonical_key(transformers_name + ".weight").removesuffix(".weight")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's key names."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[peft_key(name, "A")] = layer.lora_A.detach()
        out[peft_key(name, "B")] = layer.lora_B.detach()
    return out


def target_regex(names) -> str:
    """A regex PEFT full-matches against transformers' module names, selecting exactly `names`."""
    patterns = dict.fromkeys(re.sub(r"\.layers\.\d+\.", ".layers.#.", "model." + n) for n in names)
    patterns = dict.fromkeys(re.escape(p).replace(re.escape("#"), r"\d+") for p in patterns)
    return "|".join(patterns)


def save_adapter(model: nn.Module, directory: str | Path, base_model: str | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` as PEFT does."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise InputError("the model holds no LoRA layers to save; apply_lora or load_adapter first")
    ranks = {(m.rank, m.alpha, m.scaling) for m in layers.values()}
    if len(ranks) != 1:
        raise InputError("the LoRA layers have different ranks or alphas; PEFT's rank_pattern is not written here")
    (rank, alpha, scaling), = ranks
    first = next(iter(layers.values()))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "revision": None,
              "r": rank, "lora_alpha": alpha, "lora_dropout": getattr(first.dropout, "p", 0.0),
              "target_modules": target_regex(layers), "use_rslora": not math.isclose(scaling, alpha / rank),
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
              "modules_to_save": None, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
              "layers_to_transform": None, "layers_pattern": None}
    tensors = {k: v.float().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]], str]:
    """(adapter_config, {our layer name: {"A": A, "B": B}}, naming style) of a PEFT LoRA adapter directory,
    with every unsupported setting and foreign tensor refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, w_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not directory.is_dir():
        raise CheckpointError(f"adapter directory {directory} does not exist")
    for p in (cfg_path, w_path):
        if not p.is_file():
            hint = " (adapter_model.bin is pickled and never loaded; save with safetensors)" \
                if p == w_path and (directory / "adapter_model.bin").exists() else ""
            raise CheckpointError(f"no {p.name} in {directory}; an adapter directory holds {ADAPTER_CONFIG} and "
                                  f"{ADAPTER_WEIGHTS} as PEFT writes them{hint}")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not JSON ({e})") from None
    _check_config(config, cfg_path)
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {w_path}: {e}; the file is truncated or corrupt") from None
    layers: dict[str, dict[str, torch.Tensor]] = {}
    style, foreign = "v5", []
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            foreign.append(key)
            continue
        tname = m.group(1)
        style = "v5" if tname.startswith("model.") else "v4"
        layers.setdefault(_our_name(tname), {})[m.group(2)] = t
    if foreign:
        raise CheckpointError(f"{w_path.name} holds tensors that are not LoRA A/B matrices of linear layers "
                              f"({', '.join(foreign[:3])}); only plain LoRA adapters are supported")
    half = [n for n, ab in layers.items() if len(ab) != 2]
    if half or not layers:
        raise CheckpointError(f"{w_path.name} lacks lora_A or lora_B for {half[:3] or 'every layer'}")
    return config, layers, style


def _check_config(config: dict, path: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA; only LoRA adapters load here")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise CheckpointError(f"{path} has no {key!r}; is it a PEFT LoRA adapter_config.json?")
    odd = {k: config[k] for k, default in UNSUPPORTED.items() if config.get(k) not in (default, None, [], {}, False)}
    if odd:
        raise CheckpointError(f"{path} uses LoRA options this library does not implement: {odd}; "
                              "merge the adapter with peft (merge_and_unload) and load the merged checkpoint instead")


def _peft_selects(target_modules, module_name: str) -> bool:
    """PEFT's rule: a regex string full-matches the module name; a list matches a name or its last parts."""
    if isinstance(target_modules, str):
        return target_modules == "all-linear" or re.fullmatch(target_modules, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in target_modules)


def _styled(name: str, style: str) -> str:
    """Our layer name as the adapter's transformers version spelled it."""
    if style == "v5":
        return "model." + name
    from .keys import hub_key

    return hub_key(name + ".weight").removesuffix(".weight")


def _check_adapter_fits(model: nn.Module, config: dict, layers: dict, style: str) -> None:
    """Targets, base shapes and rank of the adapter against the model; the first mismatch is an error."""
    modules = {n: m for n, m in model.named_modules() if _is_linear(m) and not n.endswith(".base_layer")}
    modules.update({n: m.base_layer for n, m in lora_layers(model).items()})
    unknown = [n for n in layers if n not in modules]
    if unknown:
        raise CheckpointError(f"the adapter holds weights for layers this model lacks ({', '.join(unknown[:3])}); "
                              "it was made for a different base model")
    r = int(config["r"])
    for name, ab in layers.items():
        base = modules[name]
        want = {"A": (r, base.in_features), "B": (base.out_features, r)}
        for which, shape in want.items():
            if tuple(ab[which].shape) != shape:
                got = list(ab[which].shape)
                what = "rank does" if got[0 if which == "A" else 1] != r else "base shapes do"
                raise CheckpointError(f"the adapter's {what} not match: lora_{which} of {name} is {got}, but rank "
                                      f"{r} over this model's {base.out_features}x{base.in_features} layer needs "
                                      f"{list(shape)}; the adapter was made for a different base model or rank")
    selected = {n for n in modules if n != "lm_head" and _peft_selects(config["target_modules"], _styled(n, style))}
    if selected != set(layers):
        extra = sorted(selected - set(layers))[:3] or sorted(set(layers) - selected)[:3]
        shown = str(config["target_modules"])
        shown = shown if len(shown) < 100 else shown[:97] + "..."
        raise CheckpointError(f"adapter_config.json's target_modules ({shown}) select "
                              f"{len(selected)} layers of this model but the adapter holds {len(layers)} "
                              f"(differing: {', '.join(extra)}); the adapter was made for a different model")


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load a PEFT LoRA adapter into `model`, in place: its layers are wrapped (or, when the model already holds
    LoRA layers, which must be the same layers at the same rank, overwritten). Mismatches are refused."""
    config, layers, style = read_adapter(directory)
    _check_adapter_fits(model, config, layers, style)
    existing = lora_layers(model)
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    if existing:
        ranks = {m.rank for m in existing.values()}
        if set(existing) != set(layers) or ranks != {r}:
            raise InputError(f"the model already holds LoRA layers ({len(existing)} layers, rank {sorted(ranks)}) "
                             f"that differ from the adapter in {directory} ({len(layers)} layers, rank {r}); "
                             "unload_lora first")
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        for name in layers:
            _replace(model, name, LoRALinear(model.get_submodule(name), r, alpha,
                                             float(config.get("lora_dropout") or 0.0), bool(config.get("use_rslora"))))
        existing = lora_layers(model)
    with torch.no_grad():
        for name, ab in layers.items():
            existing[name].lora_A.copy_(ab["A"])
            existing[name].lora_B.copy_(ab["B"])
    return model
