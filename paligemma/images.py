"""Images in: the one loader used by the CLI, the API, training, the server and the batch runner.

Files are fully decoded with their EXIF orientation applied and their mode kept (alpha too), so the
processor can composite transparency onto white as transformers does for PIL inputs (`to_rgb`).

Guards, each with its own message: a pixel limit checked from the header before decoding (`MAX_PIXELS`,
PIL's decompression-bomb threshold by default; pass `max_pixels=` to change it), zero-size images,
non-regular files (a FIFO would block). 16-bit and 32-bit integer and float images (PIL modes I;16, I,
F) are scaled to 8 bit, not clipped (`to_8bit`). Numpy arrays (H x W, H x W x 1/3/4; uint8, uint16,
bool, or float in [0, 1]) and torch tensors (the same, or C x H x W) are accepted by `as_image`;
anything else is refused naming its type.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .checks import regular_file
from .errors import InputError

ImageLike = Image.Image | str | os.PathLike
MAX_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS: ~ a 9459 x 9459 picture, 268 MB as RGB
_WIDE = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")  # integer / float modes RGB conversion would clip


def check_size(width: int, height: int, where: str, max_pixels: int | None = None) -> None:
    """Refuse a zero-size image, or one over `max_pixels` (default `MAX_PIXELS`) before it is decoded."""
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if width <= 0 or height <= 0:
        raise InputError(f"{where} is {width}x{height} pixels: an empty image; pass a picture with pixels")
    if width * height > limit:
        raise InputError(f"{where} is {width}x{height} = {width * height:,} pixels, over the limit of {limit:,} "
                         "(a decompression bomb?); shrink it, or raise the limit (max_pixels= / "
                         "paligemma.images.MAX_PIXELS) if you trust the file")


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode an image file, applying its EXIF orientation. The mode is kept (alpha too),
    so the processor can composite transparency onto white as HF does for PIL inputs."""
    path = Path(path)
    regular_file(path, "image file", InputError)
    try:
        with warnings.catch_warnings():  # the size is checked below, with a message of our own
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
            check_size(image.width, image.height, f"image file {path}", max_pixels)
            image.load()
    except Image.DecompressionBombError:
        limit = MAX_PIXELS if max_pixels is None else max_pixels
        raise InputError(f"image file {path} has more pixels than PIL decodes ({Image.MAX_IMAGE_PIXELS * 2:,}) "
                         f"and than the limit of {limit:,} (a decompression bomb?); shrink it") from None
    except UnidentifiedImageError:
        raise InputError(f"{path} is not an image file PIL can read (png, jpeg, webp, ...)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"image file {path} could not be decoded (truncated or corrupt?): {exc}") from None
    return ImageOps.exif_transpose(image)


def to_8bit(image: Image.Image) -> Image.Image:
    """Mode L for a 16/32-bit integer or float image, scaled, not clipped: 16-bit by 255/65535, int32 and
    float by their range ([0, 1] floats and [0, 255] integers as they are; anything else min..max)."""
    if image.mode not in _WIDE:
        return image
    a = np.asarray(image).astype(np.float64)  # [H, W]
    if not np.isfinite(a).all():
        raise InputError(f"a {image.mode}-mode image holds NaN or infinite pixels; pass finite values")
    if image.mode.startswith("I;16"):
        a = a * (255 / 65535)
    elif a.size and image.mode == "F" and a.min() >= 0 and a.max() <= 1 and a.max() > 0:
        a = a * 255
    elif not a.size or (a.min() >= 0 and a.max() <= 255):
        return image  # already 8-bit values: PIL's own conversion, as transformers sees it
    elif image.mode == "I" and a.min() >= 0 and a.max() <= 65535:
        a = a * (255 / 65535)  # a 16-bit file read as 32-bit integers
    else:
        lo, hi = a.min(), a.max()
        a = (a - lo) * (255 / (hi - lo))
    return Image.fromarray(np.rint(a).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as HF's `convert_to_rgb` does it: any transparency is composited onto a white background;
    16/32-bit and float images are first scaled to 8 bit (`to_8bit`)."""
    image = to_8bit(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def from_array(array: np.ndarray, where: str = "image", max_pixels: int | None = None) -> Image.Image:
    """H x W or H x W x 1/3/4 array -> PIL image. uint8 as is; uint16 scaled by 255/65535; bool as 0/255;
    floats must be finite and in [0, 1]. Other dtypes and shapes are refused."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise InputError(f"{where} is an array of shape {list(a.shape)}; expected H x W (gray) or "
                         "H x W x 3 / 4 (RGB / RGBA)")
    check_size(a.shape[1], a.shape[0], where, max_pixels)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = np.rint(a.astype(np.float64) * (255 / 65535)).astype(np.uint8)
    elif a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise InputError(f"{where} holds NaN or infinite values; pass finite pixels")
        if a.min() < 0 or a.max() > 1:
            raise InputError(f"{where} is a float array with values in [{a.min():g}, {a.max():g}]; float pixels "
                             "must be in [0, 1] (or pass uint8 0-255)")
        a = np.rint(a.astype(np.float64) * 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise InputError(f"{where} is a {a.dtype} array; expected uint8, uint16, bool or float in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(a), mode="L" if a.ndim == 2 else ("RGB", "RGBA")[a.shape[2] - 3])


def from_tensor(tensor, where: str = "image", max_pixels: int | None = None) -> Image.Image:
    """A torch tensor, C x H x W (C = 1, 3, 4, torchvision's layout) or H x W (x C), as `from_array`."""
    import torch

    t = tensor.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[2] not in (1, 3, 4):
        t = t.permute(1, 2, 0)  # C x H x W -> H x W x C
    try:
        array = t.numpy()
    except (TypeError, RuntimeError) as e:
        raise InputError(f"{where} is a {t.dtype} tensor that numpy cannot hold ({e}); pass uint8 or float") from None
    return from_array(array, where, max_pixels)


def as_image(image, where: str = "image", max_pixels: int | None = None) -> Image.Image:
    """A PIL image (decoded and checked), a path (`load_image`), a numpy array or a torch tensor."""
    if isinstance(image, Image.Image):
        check_size(image.width, image.height, where, max_pixels)
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise InputError(f"{where} could not be decoded (truncated or corrupt file?): {exc}") from None
        return image
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, max_pixels)
    if isinstance(image, np.ndarray):
        return from_array(image, where, max_pixels)
    if type(image).__module__.startswith("torch") and hasattr(image, "detach"):
        return from_tensor(image, where, max_pixels)
    raise InputError(f"{where} is a {type(image).__name__}; expected a PIL image, a file path, a numpy array "
                     "or a torch tensor")
