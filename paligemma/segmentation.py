"""VQ-VAE mask decoder: 16 `<segNNN>` codes -> a 64x64 mask map, and pasting it into the image.

Mirrors big_vision `evaluators/proj/paligemma/transfers/segmentation.py` (`Decoder`, `ResBlock`,
`reconstruct_masks`), which runs the PyTorch-layout weights of `vae-oid.npz` in Flax. Here they run
in PyTorch directly: the module tree reproduces the published key names (`decoder.0`,
`decoder.2.net.0`, ...), so the file's arrays load without renaming. Flax
`ConvTranspose(k=4, s=2, padding=2, transpose_kernel=True)` is PyTorch
`ConvTranspose2d(k=4, s=2, padding=1)` on the stored weight (DESIGN.md, segmentation; checked against a
conv-on-dilated-input reference in tests/test_segmentation.py).

Architecture (C = 128 channels, D = code width read from the file):
    codes [N,16] -> codebook [N,4,4,D] (row-major) -> conv1x1 D->C, ReLU
    -> 2 x ResBlock(C): conv3x3 -> ReLU -> conv3x3 -> ReLU -> conv1x1, + input
    -> 4 x (ConvTranspose k4 s2 p1, ReLU) with 128, 64, 32, 16 channels: 4 -> 64 pixels
    -> conv1x1 16->1: a [N,64,64] map in about [-1, 1]; > 0 means inside the object.
"""

from __future__ import annotations

import math
import os
import warnings
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from .checks import regular_file
from .errors import CheckpointError, InputError

VAE_URLS = (
    "gs://big_vision/paligemma/vae-oid.npz",
    "https://huggingface.co/spaces/google/paligemma-hf/resolve/main/vae-oid.npz",
)
CODEBOOK_KEY = "_vq_vae._embedding"
HIDDEN = 128
UPSAMPLE_CHANNELS = (128, 64, 32, 16)
# Keys of the mask *encoder* (used by big_vision to build training targets); present in the file,
# not needed to decode, so accepted and ignored.
ENCODER_KEYS = frozenset(
    f"encoder.{name}.{p}"
    for name in ["0", "2", "4", "6", "10"] + [f"{b}.net.{i}" for b in (8, 9) for i in (0, 2, 4)]
    for p in ("weight", "bias")
)


class VAEWeightsNotFound(CheckpointError, FileNotFoundError):
    """The VQ-VAE weights file is missing."""


def expected_shapes(dim: int, num_codes: int = 128) -> dict[str, tuple[int, ...]]:
    """Every key the decoder needs, with its shape (PyTorch layout: Conv [out,in,k,k],
    ConvTranspose [in,out,k,k])."""
    shapes: dict[str, tuple[int, ...]] = {CODEBOOK_KEY: (num_codes, dim)}

    def conv(name: str, cin: int, cout: int, k: int, transpose: bool = False) -> None:
        shapes[f"{name}.weight"] = (cin, cout, k, k) if transpose else (cout, cin, k, k)
        shapes[f"{name}.bias"] = (cout,)

    conv("decoder.0", dim, HIDDEN, 1)
    for block in (2, 3):
        conv(f"decoder.{block}.net.0", HIDDEN, HIDDEN, 3)
        conv(f"decoder.{block}.net.2", HIDDEN, HIDDEN, 3)
        conv(f"decoder.{block}.net.4", HIDDEN, HIDDEN, 1)
    cin = HIDDEN
    for idx, cout in zip((4, 6, 8, 10), UPSAMPLE_CHANNELS):
        conv(f"decoder.{idx}", cin, cout, 4, transpose=True)
        cin = cout
    conv("decoder.12", cin, 1, 1)
    return shapes


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(conv3x3(x))))); `net` indices match the published keys."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)  # [N, C, h, w]


class MaskDecoder(nn.Module):
    """Decoder half of the PaliGemma mask VQ-VAE. `forward(codes int64[N,16]) -> float32[N,64,64]`."""

    def __init__(self, dim: int, num_codes: int = 128) -> None:
        super().__init__()
        self.dim, self.num_codes = dim, num_codes
        self.register_buffer("codebook", torch.zeros(num_codes, dim))  # [K, D]; file key CODEBOOK_KEY
        layers: list[nn.Module] = [nn.Conv2d(dim, HIDDEN, 1), nn.ReLU(), ResBlock(HIDDEN), ResBlock(HIDDEN)]
        cin = HIDDEN
        for cout in UPSAMPLE_CHANNELS:
            layers += [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.ReLU()]
            cin = cout
        layers.append(nn.Conv2d(cin, 1, 1))
        self.decoder = nn.Sequential(*layers)  # indices 0..12 match the file's `decoder.N`

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        n = codes.shape[0]
        x = self.codebook[codes.reshape(-1)]  # [N*16, D]
        x = x.reshape(n, 4, 4, self.dim).permute(0, 3, 1, 2)  # [N, D, 4, 4], codes row-major
        return self.decoder(x)[:, 0]  # [N, 64, 64]

    def decode_masks(self, seg_ids: Sequence[Sequence[int]] | np.ndarray | torch.Tensor) -> np.ndarray:
        """Codes [N, 16] (ints in [0, num_codes)) -> float32 [N, 64, 64] maps, > 0 inside the object."""
        if isinstance(seg_ids, torch.Tensor):
            seg_ids = seg_ids.detach().cpu().numpy()
        codes = torch.as_tensor(np.asarray(seg_ids, dtype=np.int64))  # [N, 16]
        if codes.numel() == 0:
            return np.zeros((0, 64, 64), dtype=np.float32)
        if codes.ndim != 2 or codes.shape[1] != 16:
            raise InputError(f"seg codes must be shaped [N, 16], got {list(codes.shape)}")
        if codes.min() < 0 or codes.max() >= self.num_codes:
            raise InputError(f"seg codes must be in [0, {self.num_codes - 1}], got {codes.tolist()}")
        with torch.no_grad():
            return self(codes.to(self.codebook.device)).float().cpu().numpy()  # [N, 64, 64]

    @classmethod
    def from_state_dict(cls, state: Mapping[str, np.ndarray | torch.Tensor], source: str = "weights") -> "MaskDecoder":
        """Build from published-name arrays; raises CheckpointError naming any missing or
        misshapen decoder key. Encoder keys are ignored; other unknown keys give a warning."""
        if CODEBOOK_KEY not in state:
            raise CheckpointError(f"{source}: missing key {CODEBOOK_KEY!r} (the [128, D] codebook)")
        cb_shape = tuple(state[CODEBOOK_KEY].shape)
        if len(cb_shape) != 2:
            raise CheckpointError(f"{source}: {CODEBOOK_KEY!r} has shape {cb_shape}, expected [num_codes, D]")
        num_codes, dim = cb_shape
        want = expected_shapes(dim, num_codes)
        for key, shape in want.items():
            if key not in state:
                raise CheckpointError(f"{source}: missing decoder key {key!r} (expected shape {list(shape)})")
            got = tuple(state[key].shape)
            if got != shape:
                raise CheckpointError(f"{source}: key {key!r} has shape {list(got)}, expected {list(shape)}")
        extra = sorted(set(state) - set(want) - ENCODER_KEYS)
        bad = [k for k in extra if k.startswith("decoder.") or k == CODEBOOK_KEY]
        if bad:
            raise CheckpointError(f"{source}: unexpected decoder keys {bad}; is this the PaliGemma vae-oid file?")
        if extra:
            warnings.warn(f"{source}: ignoring unknown keys {extra}", stacklevel=2)
        model = cls(dim, num_codes)
        tensors = {
            ("codebook" if k == CODEBOOK_KEY else k): torch.as_tensor(np.asarray(state[k]), dtype=torch.float32)
            for k in want
        }
        model.load_state_dict(tensors, strict=True)
        return model.eval()


def _missing_message(path: str | os.PathLike | None) -> str:
    where = f"not found at {str(path)!r}" if path else "no path given"
    return (f"VQ-VAE mask decoder weights: {where}. Download vae-oid.npz from {VAE_URLS[0]} or "
            f"{VAE_URLS[1]} and pass its path (CLI: --vae PATH).")


MAX_MEMBER_BYTES = 256 * 2**20  # vae-oid.npz's largest array is a few MB


def load_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read `vae-oid.npz` (np.load with allow_pickle=False) or a `.safetensors` copy into arrays. Member
    sizes are checked from the zip directory and each array header before anything is read."""
    p = Path(path)
    if not p.exists():
        raise VAEWeightsNotFound(_missing_message(path))
    regular_file(p, "VQ-VAE weights file")
    if p.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return dict(load_file(str(p)))
        except Exception as e:  # corrupt header, truncated file
            raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from e
    _check_npz(p)
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:  # pickled arrays, not a zip, truncated
        raise CheckpointError(f"{p}: not a readable .npz of plain arrays ({e})") from None


def _check_npz(p: Path) -> None:
    """Refuse, before reading any array, members whose uncompressed size (zip directory) or declared shape
    (.npy header) exceeds MAX_MEMBER_BYTES or the bytes the member holds."""
    try:
        with zipfile.ZipFile(p) as z:
            for info in z.infolist():
                if info.file_size > MAX_MEMBER_BYTES:
                    raise CheckpointError(f"{p}: member {info.filename!r} unpacks to {info.file_size:,} bytes, more "
                                          f"than the {MAX_MEMBER_BYTES:,} a VQ-VAE array needs; not vae-oid.npz")
                with z.open(info) as f:
                    major, _ = np.lib.format.read_magic(f)
                    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read_header(f)
                need = math.prod(shape) * dtype.itemsize
                if need > info.file_size:
                    raise CheckpointError(f"{p}: member {info.filename!r} declares shape {list(shape)} of {dtype} "
                                          f"({need:,} bytes) but holds {info.file_size:,} bytes; the file is corrupt")
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, TypeError, NotImplementedError) as e:
        raise CheckpointError(f"{p}: not a readable .npz of plain arrays ({' '.join(str(e).split())[:120]})") from None


def load_mask_decoder(path: str | os.PathLike | None, device: str | torch.device = "cpu") -> MaskDecoder:
    """Load the decoder from `vae-oid.npz` or a safetensors copy; errors say where to get the file."""
    if path is None or str(path) == "":
        raise VAEWeightsNotFound(_missing_message(None))
    return MaskDecoder.from_state_dict(load_state(path), source=str(path)).to(device)


def save_safetensors(state: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write the arrays (e.g. from `load_state("vae-oid.npz")`) as a safetensors copy."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))


def box_to_pixels(box: Sequence[float], image_w: int, image_h: int) -> tuple[int, int, int, int]:
    """Float (x0, y0, x1, y1) -> int pixel bounds, truncated like big_vision's `int(y1 * h)`, clipped."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return (min(max(x0, 0), image_w), min(max(y0, 0), image_h),
            min(max(x1, 0), image_w), min(max(y1, 0), image_h))


def paste_mask(
    mask64: np.ndarray, box: Sequence[float], image_w: int, image_h: int, threshold: float | None = 0.0
) -> np.ndarray:
    """Place a 64x64 decoder map into a [image_h, image_w] canvas at `box` (x0, y0, x1, y1 pixels).

    As big_vision's evaluator: the map is resized to the box size in whole pixels with PIL BILINEAR
    and thresholded at > 0. Returns bool [H, W] (float32 with the resized values when
    `threshold=None`); zero outside the box, all zero for an empty box.
    """
    x0, y0, x1, y1 = box_to_pixels(box, image_w, image_h)
    out = np.zeros((image_h, image_w), dtype=np.float32 if threshold is None else bool)
    if x1 <= x0 or y1 <= y0:
        return out
    m = np.asarray(mask64, dtype=np.float32)
    if m.shape != (64, 64):
        raise InputError(f"mask64 must be [64, 64], got {list(m.shape)}")
    resized = np.asarray(Image.fromarray(m).resize((x1 - x0, y1 - y0), resample=Image.BILINEAR))
    out[y0:y1, x0:x1] = resized if threshold is None else resized > threshold
    return out
