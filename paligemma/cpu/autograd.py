"""Gradients through frozen weights held in a fast format (int8 / bf16 / fp32 buffers of `QuantLinear`).

Training a LoRA adapter over a quantized base (the QLoRA idea) needs dL/dx through every frozen layer,
never dL/dW. `FrozenMatmul` runs the format's own forward (`_matmul`: the decode kernel or one GEMM) and,
in backward, computes grad_x = grad_y @ (W * scale[:, None]) with the weight widened to fp32 a block of
output rows at a time into a reused buffer, on every call: no fp32 copy of W is kept, and nothing is
saved for backward (no activation either), so it composes with activation checkpointing at no extra memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import kernels

BACKWARD_BLOCK_BYTES = 32 * 2**20  # widened weight rows per backward GEMM: bounds the transient fp32 copy


class FrozenMatmul(torch.autograd.Function):
    """y = forward_fn(x, w, scale) with y [M, N] = x [M, K] @ (w * scale[:, None]).T; gradient for x only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, forward_fn: Callable):
        ctx.w, ctx.scale, ctx.x_dtype = w, scale, x.dtype  # buffers, not activations: no memory held
        with torch.no_grad():
            return forward_fn(x, w, scale)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        return frozen_grad_input(grad_y, ctx.w, ctx.scale).to(ctx.x_dtype), None, None, None


def frozen_grad_input(grad_y: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """grad_y [M, N] @ (w [N, K] * scale[N, None]) -> [M, K], in fp32, widening `w` block by block."""
    gy = grad_y.float()
    if scale is not None:
        gy = gy * scale  # [M, N]: the per-output-channel scale moves onto the gradient
    if w.dtype == torch.float32:
        return gy @ w  # [M, K]
    rows = max(1, BACKWARD_BLOCK_BYTES // (4 * w.shape[1]))
    if rows >= w.shape[0]:
        return gy @ kernels.widen(w, torch.float32)  # [M, K]
    gx = gy.new_zeros(gy.shape[0], w.shape[1])  # [M, K]
    for r0 in range(0, w.shape[0], rows):  # widened into the kernels' reused buffer: no fresh pages per block
        gx.addmm_(gy[:, r0:r0 + rows], kernels.widen(w[r0:r0 + rows], torch.float32))
    return gx


def frozen_matmul(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, forward_fn: Callable) -> torch.Tensor:
    """`forward_fn(x, w, scale)`, differentiable in x when x needs a gradient (else called as is)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return FrozenMatmul.apply(x, w, scale, forward_fn)
    return forward_fn(x, w, scale)
