"""Weight formats for fast CPU inference: a module swap (as gpt-fast's int8 path) done while loading.

`paligemma.load(path, quantize=...)` replaces every Linear of the decoder, the vision encoder and the
projector, and the (tied) token embedding / LM head, by modules that store the weight as below. The
default, "auto", is the default CPU mode: "bf16" for a checkpoint stored in bf16 on a CPU computing in
fp32 (lossless storage), plain modules otherwise (`loading.resolve_quantize`).

  "int8"  int8 with one fp32 scale per output channel (symmetric, absmax / 127). The embedding is
          quantized per row, which is the head's output channel, so one int8 copy serves both the lookup
          and the head. 1 byte per weight. Its products quantize the activations too, per token: to int16
          levels when decoding (`kernels.gemv`'s integer route), to 7-8 bits on the int8 prefill path;
          PALIGEMMA_PREFILL=fp32 keeps them fp32.
  "bf16"  bfloat16 (the hub's own dtype for PaliGemma 2), 2 bytes per weight.
  "fp32"  float32, unchanged values; only the decode kernel differs from plain `nn.Linear` (and, in every
          fast format, the attention: `QueryChunkedAttention` for Gemma 2, `StackedDecodeAttention` for
          Gemma 1's decode steps, fp32 within ~1e-6 of transformers' ops).

Activations, norms, biases, softmax and the KV cache stay in the compute dtype: `load(dtype=...)`, fp32
by default; with dtype=torch.bfloat16 prefill runs in bf16 end to end as transformers does in bf16
(faster prefill, bf16-level accuracy), and decoding still accumulates in fp32. Few-row
products (decoding: one row per sequence, up to `kernels.MAX_ROWS`) run the streaming kernel of
`kernels.gemv`, which reads every weight once per step. Many-row products (prefill, the vision tower)
run as one GEMM per layer on the path `features.prefill_path()` chooses from the CPU's reported
features (or PALIGEMMA_PREFILL / `features.set_prefill_path`): "bf16" on CPUs with bf16 units (int8
weights widened exactly to bf16, the scale applied to the output, where the CPU has AMX; with AVX512-VNNI and no
AMX they take "int8"); "fp32" on CPUs without them (the layer's weight widened for that call only); "int8" for
int8 weights on those CPUs, and when asked
(int8 x int8 products with per-token activation scales: `own_int8_gemm`, else torch's `int8_gemm`, within
`INT8_TOLERANCE` per product); "int16" for bf16 weights on AVX2 CPUs without AVX-512 (12-bit weights
and activations, `own_int16_gemm`, within `INT16_TOLERANCE`; `prefill_path`). fp32 weights always take
fp32 GEMMs.
Quantized modules hold buffers, not parameters: fully fine-tune with `quantize=None`; a LoRA adapter
(`lora.py`) trains over them, with gradients w.r.t. their inputs from `cpu/autograd.py`.

Loading converts the checkpoint tensor by tensor, in row blocks (`quantize_rows`), so the full-precision
model is never materialised: the peak is the converted model plus one block.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..modeling_gemma import GemmaAttention, GemmaMLP, GemmaRMSNorm
from ..modeling_siglip import SiglipMLP
from . import features, kernels
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


ROW_CHUNK = 512  # rows per bf16 GEMM call
MLP_ROW_CHUNK = 128  # rows per pass through a decoder MLP at prefill (its activations are the peak's largest)
MLP_ROW_CHUNK_FP32_PATH = 512  # on the "fp32" prefill path each pass widens the MLP's 3 weights again: fewer passes
ATTN_QUERY_CHUNK = 512  # query rows per pass through Gemma 2's softcapped attention at prefill
ATTN_GEMM_ROWS = 64  # from this many query rows per kv head, scores by one GEMM per (batch row, kv head)
WIDEN_BLOCK_BYTES = 256 * 2**20  # a weight larger than this widened to fp32 (the tied head) is multiplied by
# blocks of output rows: its widened / packed copy never exists whole (1-2 GB for a 3B model's embedding)


def _matmul(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, packed=None) -> torch.Tensor:
    """x [M, K] @ w[N, K].T (* scale[N]) -> [M, N]: the kernel for few rows (fp32 out), a GEMM otherwise on
    the path `features.prefill_path()` names (fp32 out, or bf16 for bf16 activations on the bf16 path: a
    model loaded with dtype=torch.bfloat16 computes as transformers does in bf16). `packed`: the weight
    already packed for the int8 path (`pack_int8`), reused across the row chunks of one MLP."""
    # few rows: the decode kernel (but fp32 weights with 1-2 rows: MKL's matvec below streams as fast or faster)
    if x.shape[0] <= kernels.MAX_ROWS and x.device.type == "cpu" and (w.dtype != torch.float32 or x.shape[0] > 2):
        return kernels.gemv(x.float(), w, scale, int_acts=w.dtype == torch.int8 and not exact_products())
    if w.dtype == torch.float32:
        return F.linear(x.float(), w) if scale is None else F.linear(x.float(), w).mul_(scale)
    rows = max(1, WIDEN_BLOCK_BYTES // (4 * w.shape[1]))
    if packed is None and w.shape[0] > rows and x.device.type == "cpu":
        return _matmul_by_blocks(x, w, scale, rows)
    path = prefill_path(w.dtype) if x.device.type == "cpu" else "bf16"
    if path == "int8":
        y = own_int8_gemm(x.float(), w, scale) if packed is None else None
        if y is not None:
            return y  # scales inside
        return int8_gemm(x.float(), packed if packed is not None else pack_int8(w, scale))  # scales inside
    if path == "int16":
        y = own_int16_gemm(x.float(), w, scale)
        if y is not None:
            return y  # scales inside
        path = "fp32"  # K not a multiple of 16: no such layer in PaliGemma; the exact path then
    if path == "bf16" and x.dtype == torch.bfloat16:
        y = F.linear(x, w if w.dtype == torch.bfloat16 else kernels.widen(w, torch.bfloat16))
    elif path == "bf16":
        x = x.float()
        wb = w if w.dtype == torch.bfloat16 else kernels.widen(w, torch.bfloat16)  # exact: |q| <= 127
        y = x.new_empty(x.shape[0], w.shape[0])  # [M, N]
        for r0 in range(0, x.shape[0], ROW_CHUNK):  # bf16 copies of one chunk at a time: less peak memory
            y[r0:r0 + ROW_CHUNK] = F.linear(x[r0:r0 + ROW_CHUNK].to(torch.bfloat16), wb)
    else:
        y = fp32_gemm(x.float(), kernels.widen(w, torch.float32))
    return y if scale is None else y.mul_(scale)


def exact_products() -> bool:
    """Whether PALIGEMMA_PREFILL=fp32 / `features.set_prefill_path("fp32")` asks for every product in fp32 over the
    stored weights. Otherwise decoding over int8 weights quantizes its activation rows to int16 levels
    (`kernels.gemv`'s integer route), as the int8 path's prefill quantizes them to 7-8 bits; with or without
    autograd, so that a LoRA adapter at init gives the base model's logits bit for bit."""
    return features.prefill_path() == "fp32" and features.prefill_path_source() != "auto"


def fp32_gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x float32 [M, K] @ w float32 [N, K].T -> [M, N] with `features.fp32_gemm_engine()` (oneDNN or MKL)."""
    if x.device.type == "cpu" and features.fp32_gemm_engine() == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w.contiguous(), None, "none", [], "")  # [M, N]
    return F.linear(x, w)


def _matmul_by_blocks(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, rows: int) -> torch.Tensor:
    """`_matmul` over blocks of `rows` output rows of w (each row's product is computed as it would be whole;
    every format's scale is per output row): [M, K] @ w[N, K].T -> [M, N]."""
    y = None
    for r0 in range(0, w.shape[0], rows):
        part = _matmul(x, w[r0:r0 + rows], None if scale is None else scale[r0:r0 + rows])  # [M, rows]
        if y is None:
            y = part.new_empty(x.shape[0], w.shape[0])  # [M, N]
        y[:, r0:r0 + part.shape[1]] = part
    return y


def prefill_path(weights: torch.dtype) -> str:
    """The GEMM path of a many-row product over `weights` (bf16 / int8): `features.prefill_path()`, except that
    on the automatic path, for inference, when the compiled kernels are built:
      - int8 weights take the "int8" path: ~0.45x the fp32 GEMM's time with AVX2 (benchmarks/bench_gemm.py),
        and its 7-8 bit per-token activations cost a model whose weights are already 8-bit little (shipped
        model's task figures within 0.3 points, benchmarks/RESULTS.md); so do they on the automatic "bf16"
        path of a CPU with AVX512-VNNI and no AMX (`features.int8_gemm_beats_bf16`: Zen 4 / 5);
      - bf16 weights (the default mode) take the "int16" path where the CPU has AVX2 and no AVX-512
        (`features.int16_gemm_pays`): 12-bit weights and activations, 0.56-1.0x MKL's fp32 time (bench_gemm), products
        within ~1e-3 of fp32 (INT16_TOLERANCE; logits within the default mode's 1e-2). With AVX-512 the fp32
        GEMM runs as many multiply-adds per instruction, so bf16 weights stay exact there.
    PALIGEMMA_PREFILL=fp32 keeps every product exact on fp32 GEMMs (and decoding's, `exact_products`); so does
    a training step's product whose input needs no gradient (autograd runs the others' forward without it:
    `cpu/autograd.py`), and the backward multiplies by the same weights in fp32. A forced "int16" without the
    kernels is "fp32"."""
    path = features.prefill_path()
    built = kernels.extension() is not None
    if not torch.is_grad_enabled() and features.prefill_path_source() == "auto" and built:
        if weights == torch.int8 and (path == "fp32" or (path == "bf16" and features.int8_gemm_beats_bf16())):
            return "int8"
        if path == "fp32" and weights == torch.bfloat16 and features.int16_gemm_pays():
            return "int16"
    if path == "int16" and not built:
        return "fp32"
    return path


# ---- the int8 prefill path: int8 x int8 GEMMs, int32 accumulation ------------------------------------------
INT8_TOLERANCE = 4e-2  # stated bound of one int8-path product's max error relative to max |fp32 result|


def own_int8_gemm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor | None:
    """x float32 [M, K] @ w[N, K].T -> float32 [M, N] with the compiled int8 GEMM (`kernels.gemm_int8`), which
    reads int8 weights where they lie (bf16 weights are quantized per output channel into a scratch buffer
    first); None when it is not built or K is not a multiple of 16 (torch's quantized engines then)."""
    if w.dtype == torch.int8:
        return kernels.gemm_int8(x, w, scale)
    if not kernels.gemm_int8_fits(x, w):
        return None
    q, s = kernels.scratch(w.shape, torch.int8), torch.empty(w.shape[0], dtype=torch.float32)
    return kernels.gemm_int8(x, *kernels.quantize_rows(w, q, s))


# ---- the int16 prefill path: 12-bit weights x 12-bit activations, int32 block sums ----------------------
INT16_TOLERANCE = 2e-3  # stated bound of one int16-path product's max error relative to max |fp32 result|


def own_int16_gemm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor | None:
    """x float32 [M, K] @ w[N, K].T (* scale[N]) -> float32 [M, N] with the compiled int16 GEMM
    (`kernels.gemm_int16`: bf16 weights quantized per output channel to 12 bits tile by tile inside the
    kernel, no copy; int8 weights as they are); None when it is not built or K is not a multiple of 16."""
    return kernels.gemm_int16(x, w, scale)


def pack_int8(w: torch.Tensor, scale: torch.Tensor | None):
    """weight [N, K] (int8 with its per-channel scale, or bf16 quantized here per output channel) -> the
    engine's packed int8 weight. Done once per layer per call (a second copy of one layer at a time)."""
    if w.dtype == torch.int8:
        q, s = w, scale
    else:
        q = kernels.scratch(w.shape, torch.int8)
        s = torch.empty(w.shape[0], dtype=torch.float32)
        if kernels.quantize_rows(w, q, s) is None:
            q, s = quantize_rows_torch(w)
    features.silence_quantized_deprecation()
    engine, previous = features.int8_gemm_engine(), torch.backends.quantized.engine
    torch.backends.quantized.engine = engine  # the packed weight remembers its engine
    try:
        qw = torch._make_per_channel_quantized_tensor(q, s.double(), torch.zeros(q.shape[0], dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qw, None)
    finally:
        torch.backends.quantized.engine = previous


def int8_gemm(x: torch.Tensor, packed) -> torch.Tensor:
    """x float32 [M, K] @ packed int8 weight -> float32 [M, N]. Activations get one scale per token (row):
    each row is divided by its max |x| before the engine's per-tensor dynamic quantization and the result
    multiplied back, so one token's outliers do not cost the others their precision. Without VNNI, 7-bit
    activations (`reduce_range`) keep AVX2's `vpmaddubsw` from saturating its int16 pair sums."""
    s = x.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30)  # [M, 1]
    y = torch.ops.quantized.linear_dynamic(x / s, packed, not features.has_vnni())  # [M, N]
    return y.mul_(s)


class QuantLinear(nn.Module):
    """y = x @ (weight * weight_scale[:, None]).T + bias, weight stored as int8 / bf16 / fp32."""

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: str, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FORMATS[fmt], device=device))
        scale = torch.empty(out_features, dtype=torch.float32, device=device) if fmt == "int8" else None
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    packed = None  # the int8 path's packed weight, held while an MLP runs its row chunks (`holding_packed`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        y = frozen_matmul(x2, self.weight, self.weight_scale,  # [M, N]; grad for x only (LoRA)
                          lambda x, w, s: _matmul(x, w, s, self.packed))
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
    once), with the fast formats' GELU (`kernels.gelu_tanh_`: GELU and the product in one pass). Only fast
    formats use it: MKL's results depend on the row count, and plain modules must match transformers bit
    for bit."""

    @classmethod
    def wrap(cls, mlp: GemmaMLP) -> RowChunkedMLP:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.gate_proj, new.up_proj, new.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if torch.is_grad_enabled():  # training: the same values, through autograd
            return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))
        if rows <= MLP_ROW_CHUNK:  # decoding: no path lookup per step
            return self._geglu_in_place(x)
        path = prefill_path(self.gate_proj.weight.dtype)
        chunk = MLP_ROW_CHUNK_FP32_PATH if path in ("fp32", "int16") or (path == "int8" and kernels.extension()) \
            else MLP_ROW_CHUNK
        if rows <= chunk:
            return self._geglu_in_place(x)
        passes = -(-rows // chunk)
        chunk = -(-rows // passes)  # as many passes, of even size: 1072 rows -> 3 x 358, not 512 + 512 + 48
        flat = x.reshape(rows, x.shape[-1])  # [M, H]
        out = torch.empty_like(flat)
        with holding_packed(self.gate_proj, self.up_proj, self.down_proj):  # int8 path: pack once, not per chunk
            for r0 in range(0, rows, chunk):
                out[r0:r0 + chunk] = self._geglu_in_place(flat[r0:r0 + chunk])
        return out.view_as(x)

    def _geglu_in_place(self, x: torch.Tensor) -> torch.Tensor:
        """`GemmaMLP.forward` with GELU and the product in one pass, in place in the gate's output
        (`kernels.gelu_tanh_`, within ~1e-6 of torch's GELU): two [rows, intermediate] buffers alive instead of
        three (inference only: autograd needs the inputs)."""
        h = self.gate_proj(x)  # [..., I], a fresh tensor
        return self.down_proj(kernels.gelu_tanh_(h, self.up_proj(x)))


class FusedRMSNorm(GemmaRMSNorm):
    """Gemma's RMSNorm for fp32 inference: torch's fused kernel (`F.rms_norm`, the mean of squares in one pass,
    no x**2 temporary) with the (1 + w) scale applied in place. The plain module holds three tensors of the
    input's size at once (x**2, the normalised x, the scaled result), this one one: at a 896 px prefill each is
    [4108, 2304] fp32, 38 MB, and the norms were the layers' peak; 33 against 54 ms each there (2 threads).
    Autograd and bf16 activations keep the plain computation. Only fast formats use it; plain modules keep
    transformers' computation."""

    @classmethod
    def wrap(cls, norm: GemmaRMSNorm) -> FusedRMSNorm:
        new = cls.__new__(cls)
        new.__dict__ = norm.__dict__.copy()  # the same weight and eps
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != torch.float32 or self.weight.dtype != torch.float32:
            return super().forward(x)
        return F.rms_norm(x, (x.shape[-1],), None, self.eps).mul_(1.0 + self.weight)  # [..., H]


class _GeluTanh(torch.autograd.Function):
    """`kernels.gelu_tanh_` out of place with its derivative, so that training computes the values inference
    does (a LoRA adapter at init gives the base model's logits bit for bit, with or without autograd)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return kernels.gelu_tanh_(x.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        k, c = math.sqrt(2.0 / math.pi), 0.044715
        t = torch.tanh(k * (x + c * x * x * x))
        return grad * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * c * x * x))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """gelu(x, approximate="tanh") as the fast formats compute it (`kernels.gelu_tanh_`), differentiable."""
    return _GeluTanh.apply(x) if x.requires_grad else kernels.gelu_tanh_(x.clone())


class FusedGeluSiglipMLP(SiglipMLP):
    """SigLIP's MLP with the fast formats' GELU (`kernels.gelu_tanh_`, within ~1e-6 of torch's), in place in
    fc1's output at inference. Only fast formats use it; the exact model keeps torch's GELU."""

    @classmethod
    def wrap(cls, mlp: SiglipMLP) -> FusedGeluSiglipMLP:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.fc1, new.fc2 = mlp.fc1, mlp.fc2
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # training: the same values, through autograd
            return self.fc2(gelu_tanh(self.fc1(x)))
        return self.fc2(kernels.gelu_tanh_(self.fc1(x)))  # fc1's output is a fresh tensor


def rope_in_place(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` for inference with the result and one half-size buffer, where the plain form makes four
    tensors of x's size (x * cos, the rotated halves, their product with sin, the sum): at a 896 px prefill the
    queries are [8, 4108, 256] fp32, 34 MB. x [B, h, T, hd]; cos, sin [B, T, hd]. The same products and sums,
    rounded the same: bit for bit apply_rope's result."""
    half = x.shape[-1] // 2
    c, s = cos[:, None], sin[:, None]  # [B, 1, T, hd]
    out = x * c  # [B, h, T, hd]
    tmp = torch.mul(x[..., half:], s[..., :half])  # [B, h, T, hd/2]
    out[..., :half].sub_(tmp)  # x1 cos - x2 sin
    out[..., half:].add_(torch.mul(x[..., :half], s[..., half:], out=tmp))  # x2 cos + x1 sin
    return out


def _fast_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The fast attentions' rotation: in place (`rope_in_place`) for inference, the plain one under autograd."""
    return GemmaAttention._rope(self, x, cos, sin) if torch.is_grad_enabled() else rope_in_place(x, cos, sin)


class QueryChunkedAttention(GemmaAttention):
    """Gemma 2's softcapped attention (no SDPA kernel can softcap) for inference, `ATTN_QUERY_CHUNK` query rows
    at a time: a 448 / 896 px prompt (1036 / 4108 tokens) would make [B, nh, T, T] fp32 scores of 34 / 540 MB
    per batch row, three of them alive at once in transformers' form (scores, softcap, softmax). Each query
    row's softmax is its own, so the result is the unchunked one (summation order aside). The heads that share
    a key/value head are multiplied as one [g * C, hd] block against it (no repeated copy of the keys and
    values, which at decode would be the whole cache per step), and `kernels.softcap_softmax_` turns each
    chunk's scores into probabilities in place in one pass. Only fast formats use it; the exact model keeps
    transformers' computation."""

    @classmethod
    def wrap(cls, attn: GemmaAttention) -> GemmaAttention:
        new = cls.__new__(cls)
        new.__dict__ = attn.__dict__.copy()  # the same submodules and settings
        return new

    _rope = _fast_rope

    def _softcapped(self, q, k, v, mask) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super()._softcapped(q, k, v, mask)
        B, nh, T, hd = q.shape
        g = nh // self.nkv
        out = q.new_empty(B, nh, T, hd)
        for t0 in range(0, T, ATTN_QUERY_CHUNK):
            t1 = min(T, t0 + ATTN_QUERY_CHUNK)
            qc = q[:, :, t0:t1].reshape(B, self.nkv, g * (t1 - t0), hd)  # heads of one kv head stacked
            out[:, :, t0:t1] = self._chunk(qc, k, v, mask[:, t0:t1]).view(B, nh, t1 - t0, hd)
        return out

    def _chunk(self, qc, k, v, mask) -> torch.Tensor:
        """Queries [B, nkv, R, hd] (R = g * C: the g heads of each kv head, C query rows each), keys and values
        [B, nkv, K, hd], mask bool [B or 1, C, K] (1: the same for every row) -> [B, nkv, R, hd]."""
        B, nkv, R, hd = qc.shape
        heads, pre = R // mask.shape[1], self.scale / self.softcap
        if R < ATTN_GEMM_ROWS or qc.dtype != torch.float32 or qc.device.type != "cpu":  # decoding: one batched product
            s = torch.matmul(qc, k.transpose(2, 3))  # [B, nkv, R, K] raw scores
            kernels.softcap_softmax_(s.view(B * nkv * heads, R // heads, -1), mask, pre, self.softcap)
            return torch.matmul(s, v)  # [B, nkv, R, hd]
        y = torch.empty_like(qc)
        for b in range(B):
            for j in range(nkv):
                s = fp32_gemm(qc[b, j], k[b, j])  # [R, K]: oneDNN's GEMM beats the batched matmul on this shape
                kernels.softcap_softmax_(s.view(heads, R // heads, -1), mask[b:b + 1] if mask.shape[0] > 1 else mask,
                                         pre, self.softcap)
                torch.matmul(s, v[b, j], out=y[b, j])  # [R, hd]
        return y


class StackedDecodeAttention(GemmaAttention):
    """PaliGemma 1's attention (no softcap) for inference: a decode step's query (one row per sequence) takes
    the heads that share a key/value head as the rows of one product against it, [B, nkv, g, K] scores by a
    batched matmul, where SDPA's CPU kernel took ~1.8x as long for a batch of 4 (8 heads on 1 kv head,
    ~300 cached keys: 390 against 210 us a layer with AVX2). Prefill and autograd keep SDPA. Only fast
    formats use it; the exact model keeps transformers' computation."""

    wrap = classmethod(QueryChunkedAttention.wrap.__func__)
    _rope = _fast_rope

    def _attend(self, q, k, v, mask) -> torch.Tensor:
        B, nh, T, hd = q.shape
        if T != 1 or torch.is_grad_enabled() or q.device.type != "cpu" or q.dtype != torch.float32:
            return super()._attend(q, k, v, mask)
        qs = q.reshape(B, self.nkv, nh // self.nkv, hd)  # [B, nkv, g, hd]: the heads of a kv head as rows
        s = torch.matmul(qs, k.transpose(2, 3)).mul_(self.scale)  # [B, nkv, g, K]
        s.masked_fill_(~mask[:, None], torch.finfo(s.dtype).min)  # mask [B, 1, K]: a decode row sees itself
        return torch.matmul(torch.softmax(s, dim=-1), v).view(B, nh, 1, hd)  # [B, nh, 1, hd]


@contextlib.contextmanager
def holding_packed(*modules: nn.Module):
    """On the int8 path without the compiled kernels (torch's quantized engines), pack each QuantLinear's
    weight once for the duration of the block."""
    linears = [m for m in modules if isinstance(m, QuantLinear) and m.weight.dtype != torch.float32
               and m.weight.device.type == "cpu"]
    if not linears or prefill_path(linears[0].weight.dtype) != "int8" or kernels.extension() is not None:
        yield
        return
    try:
        for m in linears:
            m.packed = pack_int8(m.weight, m.weight_scale)
        yield
    finally:
        for m in linears:
            m.packed = None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def swap_modules(model: nn.Module, fmt: str, dtype: torch.dtype = torch.float32) -> set[str]:
    """Replace, in place, the Linear and token-Embedding modules of the decoder, vision encoder, projector
    and head by their `fmt` versions (new empty buffers on the weights' device, meta when built there), the
    decoder MLPs by row-chunked ones, SigLIP's MLPs by ones with GELU in place, Gemma 2's softcapped
    attention by a query-chunked one, Gemma 1's by one that stacks heads at decode and the decoder's RMSNorms
    by fused ones. Returns the parameter
    names whose stored tensors must be converted with `convert`."""
    for name, module in list(model.named_modules()):
        if type(module) is GemmaMLP:
            _replace(model, name, RowChunkedMLP.wrap(module))
        elif type(module) is SiglipMLP:
            _replace(model, name, FusedGeluSiglipMLP.wrap(module))
        elif type(module) is GemmaAttention:
            kind = StackedDecodeAttention if module.softcap is None else QueryChunkedAttention
            _replace(model, name, kind.wrap(module))
        elif type(module) is GemmaRMSNorm:
            _replace(model, name, FusedRMSNorm.wrap(module))
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
