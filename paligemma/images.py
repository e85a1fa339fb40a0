"""Images in: the one loader used by the CLI, the API, training, the server and the batch runner.

Files are fully decoded with their EXIF orientation applied and their mode kept (alpha too), so the
processor can composite transparency onto white as transformers does for PIL inputs (`to_rgb`).
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

ImageLike = Image.Image | str | os.PathLike


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file, applying its EXIF orientation. The mode is kept (alpha too),
    so the processor can composite transparency onto white as HF does for PIL inputs."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image file {path} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        image = Image.open(path)
        image.load()
    except UnidentifiedImageError as exc:
        raise InputError(f"{path} is not an image file PIL can read (png, jpeg, webp, ...)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"image file {path} could not be decoded (truncated or corrupt?): {exc}") from exc
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as HF's `convert_to_rgb` does it: any transparency is composited onto a white background."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def as_image(image: ImageLike) -> Image.Image:
    """A PIL image (returned as is) or a path, opened with `load_image` (errors name the file)."""
    return image if isinstance(image, Image.Image) else load_image(image)
