"""Weight formats for fast CPU inference: a module swap (as gpt-fast's int8 path) done while loading.

`paligemma.load(path, quantize=...)` replaces every Linear of the decoder, the vision encoder and the
projector, and the (tied) token embedding / LM head, by modules that store the weight as below. The
default, "auto", is the default CPU mode: "bf16" for a checkpoint stored in bf16 on a CPU computing in
fp32 (lossless storage), plain modules otherwise (`loading.resolve_quantize`).

  "int8"  int8 with one fp32 scale per output channel (symmetric, absmax / 127: weight-only, no
          activation quantization). The embedding is quantized per row, which is the head's output
          channel, so one int8 copy serves both the lookup and the head. 1 byte per weight.
  "bf16"  bfloat16 (the hub's own dtype for PaliGemma 2), 2 bytes per weight.
  "fp32"  float32, unchanged values; only the decode kernel differs from plain `nn.Linear`.

Activations, norms, biases, softmax and the KV cache stay in the compute dtype: `load(dtype=...)`, fp32
by default; with dtype=torch.bfloat16 prefill runs in bf16 end to end as transformers does in bf16
(faster prefill, bf16-level accuracy), and decoding still accumulates in fp32. Few-row
products (decoding: one row per sequence, up to `kernels.MAX_ROWS`) run the streaming kernel of
`kernels.gemv`, which reads every weight once per step. Many-row products (prefill, the vision tower)
run as one GEMM per layer: in bf16 on CPUs with bf16 matrix units (AMX / AVX512-BF16; int8 weights are
widened exactly to bf16 and the scale is applied to the output), otherwise in fp32 with the layer's
weight widened for that call only. PALIGEMMA_PREFILL_BF16=0/1 (or `PREFILL_BF16`) forces either.
Quantized modules hold buffers, not parameters: fully fine-tune with `quantize=None`; a LoRA adapter
(`lora.py`) trains over them, with gradients w.r.t. their inputs from `cpu/autograd.py`.

Loading converts the checkpoint tensor by tensor, in row blocks (`quantize_rows`), so the full-precision
model is never materialised: the peak is the converted model plus one block.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..modeling_gemma import GemmaMLP
from . import kernels
from .autograd import frozen_matmul

FORMATS = {"int8": torch.int8, "bf16": torch.bfloat16, "fp32": torch.float32}


def check_format(quantize: str | None) -> str | None:
    if quantize is not None and quantize not in FORMATS:
        raise InputError(f"quantize={quantize!r} is not a weight format; use one of {', '.join(FORMATS)}, "
                         "'auto' or None")
    return quantize


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float[N, K] -> (int8[N, K], fp32 scale[N]) with w ~= q * scale[:, None]; all-zero rows get scale 1.
    Round half to even, in fp32 (the compiled kernel computes exactly the same)."""
    fast = kernels.quantize_rows(w) if w.dim() == 2 else None
    return fast if fast is not None else quantize_rows_torch(w)


def quantize_rows_torch(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` in plain PyTorch (the fallback, and the kernel's reference)."""
    w = w.float()
    scale = w.abs().amax(dim=1) / 127.0  # [N]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # [N, K]
    return q, scale


# Many-row products of int8/bf16 weights in bf16 (True), in fp32 (False), or in bf16 when the CPU has
# bf16 matrix units (None). bf16 rounds the activations (8-bit significand): logits move ~1e-2 relative,
# as with transformers in bf16. fp32 keeps a bf16 checkpoint's bf16 mode equal to fp32 (summation order aside).
_env = os.environ.get("PALIGEMMA_PREFILL_BF16")
PREFILL_BF16: bool | None = None if _env in (None, "", "auto") else _env == "1"


ROW_CHUNK = 512  # rows per bf16 GEMM call
MLP_ROW_CHUNK = 128  # rows per pass through a decoder MLP at prefill (its activations are the peak's largest)


def prefill_in_bf16() -> bool:
    return kernels.bf16_matmul_is_fast() if PREFILL_BF16 is None else PREFILL_BF16


def _matmul(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ w[N, K].T (* scale[N]) -> [M, N]: the kernel for few rows (fp32 out), a GEMM otherwise
    (fp32 out, or bf16 for bf16 activations: a model loaded with dtype=torch.bfloat16 computes as
    transformers does in bf16, without converting activations at every layer)."""
    if x.shape[0] <= kernels.MAX_ROWS and x.device.type == "cpu" and (w.dtype != torch.float32 or x.shape[0] > 2):
        return kernels.gemv(x.float(), w, scale)  # fp32 weights, 1-2 rows: MKL's matvec streams as fast or faster
    if w.dtype == torch.float32:
        y = F.linear(x.float(), w)
    elif prefill_in_bf16() and x.dtype == torch.bfloat16:
        y = F.linear(x, w if w.dtype == torch.bfloat16 else kernels.widen(w, torch.bfloat16))
    elif prefill_in_bf16():
        x = x.float()
        wb = w if w.dtype == torch.bfloat16 else kernels.widen(w, torch.bfloat16)  # exact: |q| <= 127
        y = x.new_empty(x.shape[0], w.shape[0])  # [M, N]
        for r0 in range(0, x.shape[0], ROW_CHUNK):  # bf16 copies of one chunk at a time: less peak memory
            y[r0:r0 + ROW_CHUNK] = F.linear(x[r0:r0 + ROW_CHUNK].to(torch.bfloat16), wb)
    else:
        y = F.linear(x.float(), kernels.widen(w, torch.float32))
    return y if scale is None else y.mul_(scale)


class QuantLinear(nn.Module):
    """y = x @ (weight * weight_scale[:, None]).T + bias, weight stored as int8 / bf16 / fp32."""

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: str, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FORMATS[fmt], device=device))
        scale = torch.empty(out_features, dtype=torch.float32, device=device) if fmt == "int8" else None
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        y = frozen_matmul(x2, self.weight, self.weight_scale, _matmul)  # [M, N]; grad for x only (LoRA)
        if self.bias is not None:
            y.add_(self.bias)  # y is a fresh tensor
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


class QuantEmbedding(nn.Module):
    """Token embedding in int8 / bf16 / fp32 that also serves as the tied LM head (`attend`)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: str, dtype=torch.float32, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.fmt, self.out_dtype = num_embeddings, embedding_dim, fmt, dtype
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=FORMATS[fmt], device=device))
        scale = torch.empty(num_embeddings, dtype=torch.float32, device=device) if fmt == "int8" else None
        self.register_buffer("weight_scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight[ids].float()  # [..., H]
        if self.weight_scale is not None:
            rows = rows * self.weight_scale[ids][..., None]
        return rows.to(self.out_dtype)

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [..., V] against the embedding rows (the tied head)."""
        y = frozen_matmul(h.reshape(-1, self.embedding_dim), self.weight, self.weight_scale, _matmul)  # [M, V]
        return y.view(*h.shape[:-1], self.num_embeddings).to(h.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, fmt={self.fmt}"


class RowChunkedMLP(GemmaMLP):
    """A decoder MLP that runs inference (no grad) `MLP_ROW_CHUNK` rows at a time: its [rows, intermediate]
    activations are the largest tensors of a prefill (a batch of 4 prompts: ~70 MB each, several alive at
    once). Only fast formats use it: MKL's results depend on the row count, and plain modules must match
    transformers bit for bit."""

    @classmethod
    def wrap(cls, mlp: GemmaMLP) -> RowChunkedMLP:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.gate_proj, new.up_proj, new.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows <= MLP_ROW_CHUNK or torch.is_grad_enabled():
            return super().forward(x)
        flat = x.reshape(rows, x.shape[-1])  # [M, H]
        out = torch.empty_like(flat)
        for r0 in range(0, rows, MLP_ROW_CHUNK):
            out[r0:r0 + MLP_ROW_CHUNK] = super().forward(flat[r0:r0 + MLP_ROW_CHUNK])
        return out.view_as(x)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def swap_modules(model: nn.Module, fmt: str, dtype: torch.dtype = torch.float32) -> set[str]:
    """Replace, in place, the Linear and token-Embedding modules of the decoder, vision encoder, projector
    and head by their `fmt` versions (new empty buffers on the weights' device, meta when built there), and
    the decoder MLPs by row-chunked ones. Returns the parameter names whose stored tensors must be
    converted with `convert`."""
    for name, module in list(model.named_modules()):
        if type(module) is GemmaMLP:
            _replace(model, name, RowChunkedMLP.wrap(module))
    converted = set()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            new = QuantLinear(module.in_features, module.out_features, module.bias is not None, fmt, dtype,
                              module.weight.device)
        elif isinstance(module, nn.Embedding) and name.endswith("embed_tokens"):
            new = QuantEmbedding(module.num_embeddings, module.embedding_dim, fmt, dtype, module.weight.device)
        else:
            continue
        _replace(model, name, new)
        converted.add(f"{name}.weight")
    return converted


def weight_format(model: nn.Module) -> str | None:
    """The weight format a model holds: "int8" / "bf16" / "fp32" for a fast-format model, None for plain
    modules (the one place that says it; loading, training and the CLI ask here)."""
    for module in model.modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            return module.fmt
    return None


def convert(name: str, blocks, shape: tuple[int, ...], fmt: str) -> dict[str, torch.Tensor]:
    """Build the stored form of weight `name` [N, K] from (row0, float block) pairs: {name: weight} and,
    for int8, {name_scale: scale}. Blocks are converted and dropped one at a time."""
    out = torch.empty(shape, dtype=FORMATS[fmt])
    scale = torch.empty(shape[0], dtype=torch.float32) if fmt == "int8" else None
    for r0, block in blocks:
        r1 = r0 + block.shape[0]
        if fmt == "int8":  # straight into the destination rows: no per-block allocation
            if kernels.quantize_rows(block, out[r0:r1], scale[r0:r1]) is None:
                out[r0:r1], scale[r0:r1] = quantize_rows_torch(block)
        else:
            out[r0:r1] = block  # copy_ casts (bf16 -> fp32 is exact; fp32 -> bf16 rounds to nearest)
    result = {name: out}
    if scale is not None:
        result[name.removesuffix("weight") + "weight_scale"] = scale
    return result
