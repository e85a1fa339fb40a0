"""Image inputs of the server: `data:` URIs always, http(s) URLs and local files only when the operator allows.

- `data:image/png;base64,...` (PNG, JPEG, WebP, GIF: its first frame) is always accepted.
- `http(s)://` only with `allow_remote`: the host must be in `allowed_domains` (when given; a name also
  allows its subdomains), must not resolve to a private, loopback, link-local or reserved address unless
  `allow_private`, redirects are followed only to the same host, and the fetch has a timeout and a byte cap.
- `file://` (or a bare absolute path) only under `local_root`; the path is resolved (`..` and symlinks
  followed) and must stay inside it.
- Every image is checked against `max_pixels` from its header, before it is decoded (decompression bombs).

All refusals raise `InputError` with a message naming the problem; the HTTP layer turns them into 400s.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError

FORMATS = {"PNG", "JPEG", "WEBP", "GIF"}


@dataclass(kw_only=True)
class MediaPolicy:
    allow_remote: bool = False
    allowed_domains: tuple[str, ...] = ()  # empty: any public host
    allow_private: bool = False  # remote URLs may point at private/loopback addresses
    fetch_timeout: float = 10.0
    max_bytes: int = 20 * 2**20
    local_root: Path | None = None
    max_pixels: int = 50_000_000
    max_redirects: int = 3


def load_image_url(url: str, policy: MediaPolicy) -> Image.Image:
    """The decoded PIL image (EXIF orientation applied) that `url` names, if `policy` allows it."""
    if not isinstance(url, str) or not url:
        raise InputError("image_url.url is empty; send a data: URI (data:image/png;base64,...)")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_image(parse_data_uri(url, policy.max_bytes), policy.max_pixels)
    if scheme in ("http", "https"):
        return decode_image(fetch_remote(url, policy), policy.max_pixels)
    if scheme == "file" or url.startswith("/"):
        return decode_image(read_local(url, policy), policy.max_pixels)
    if _looks_base64(url):
        raise InputError("the image is raw base64; wrap it as a data URI: data:image/png;base64,<data>")
    raise InputError(f"unsupported image URL scheme {scheme or url[:20]!r}; use a data: URI "
                     "(or http(s):// / file:// where the server allows them)")


# ---------------------------------------------------------------------------------------------- data:
def parse_data_uri(url: str, max_bytes: int) -> bytes:
    head, sep, data = url.partition(",")
    if not sep:
        raise InputError("malformed data URI: no ',' before the data; expected data:image/png;base64,<data>")
    meta = head[5:].split(";")
    mime = meta[0].lower()
    if mime and not mime.startswith("image/"):
        raise InputError(f"data URI media type {mime!r} is not an image; use image/png, image/jpeg, image/webp "
                         "or image/gif")
    if "base64" not in [m.lower() for m in meta[1:]]:
        raise InputError("data URI is not base64; expected data:image/png;base64,<data>")
    if len(data) * 3 // 4 > max_bytes:
        raise InputError(f"the image is over the server's limit of {max_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("the data URI's base64 is malformed (invalid characters or padding)") from None


def _looks_base64(s: str) -> bool:
    return len(s) > 64 and all(c.isalnum() or c in "+/=\n" for c in s[:256])


# ---------------------------------------------------------------------------------------------- decode
def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> PIL image, refusing unknown formats and anything over `max_pixels` before decoding."""
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InputError("the image data is not a PNG, JPEG, WebP or GIF image") from None
    except Image.DecompressionBombError:
        raise InputError(f"the image has more pixels than the server's limit of {max_pixels}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"the image could not be read: {exc}") from None
    if image.format not in FORMATS:
        raise InputError(f"image format {image.format} is not accepted; send PNG, JPEG, WebP or GIF")
    w, h = image.size
    if w * h > max_pixels:
        raise InputError(f"the image is {w}x{h} = {w * h} pixels, over the server's limit of {max_pixels}")
    if w == 0 or h == 0:
        raise InputError("the image is empty (0 pixels)")
    try:
        image.seek(0)  # GIF/animated WebP: the first frame
        image.load()
    except Image.DecompressionBombError:
        raise InputError(f"the image has more pixels than the server's limit of {max_pixels}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InputError(f"the image could not be decoded (truncated or corrupt?): {exc}") from None
    return ImageOps.exif_transpose(image)


# ---------------------------------------------------------------------------------------------- remote
def fetch_remote(url: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_remote:
        raise InputError("remote image URLs are disabled on this server; send the image as a data: URI "
                         "(the operator can allow them with --allow-remote-images)")
    import httpx

    first_host = None
    for _ in range(policy.max_redirects + 1):
        host = check_remote_url(url, policy)
        if first_host is None:
            first_host = host
        elif host != first_host:
            raise InputError(f"the image URL redirects to another host ({host}); only same-host redirects are followed")
        try:
            with httpx.stream("GET", url, timeout=policy.fetch_timeout, follow_redirects=False) as resp:
                if resp.is_redirect:
                    url = urllib.parse.urljoin(url, resp.headers.get("location", ""))
                    continue
                if resp.status_code != 200:
                    raise InputError(f"fetching the image URL answered HTTP {resp.status_code}")
                return _read_capped(resp, policy.max_bytes)
        except httpx.TimeoutException:
            raise InputError(f"fetching the image URL took longer than {policy.fetch_timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise InputError(f"fetching the image URL failed: {type(exc).__name__}") from None
    raise InputError(f"the image URL redirected more than {policy.max_redirects} times")


def _read_capped(resp, max_bytes: int) -> bytes:
    declared = resp.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise InputError(f"the remote image is {declared} bytes, over the server's limit of {max_bytes}")
    buf = bytearray()
    for chunk in resp.iter_bytes():
        buf += chunk
        if len(buf) > max_bytes:
            raise InputError(f"the remote image is over the server's limit of {max_bytes} bytes")
    return bytes(buf)


def check_remote_url(url: str, policy: MediaPolicy) -> str:
    """The URL's host, after checking the allow-list and that it resolves to no forbidden address."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    if not host:
        raise InputError(f"the image URL {url[:80]!r} has no host")
    if policy.allowed_domains and not any(host == d or host.endswith("." + d) for d in policy.allowed_domains):
        raise InputError(f"image host {host} is not in the server's allowed domains")
    if not policy.allow_private:
        try:
            infos = socket.getaddrinfo(host, parts.port or 443, proto=socket.IPPROTO_TCP)
        except socket.gaierror:
            raise InputError(f"image host {host} does not resolve") from None
        for info in infos:
            addr = ipaddress.ip_address(info[4][0].split("%")[0])
            if not addr.is_global or addr.is_multicast:
                raise InputError(f"image host {host} resolves to a private or loopback address ({addr}); refused")
    return host


# ---------------------------------------------------------------------------------------------- local
def read_local(url: str, policy: MediaPolicy) -> bytes:
    if policy.local_root is None:
        raise InputError("local image files are disabled on this server; send the image as a data: URI "
                         "(the operator can allow a folder with --allowed-local-media-path)")
    raw = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if url.startswith("file:") else url
    root = Path(policy.local_root).resolve()
    try:
        path = Path(raw).resolve(strict=True)
    except (OSError, RuntimeError):
        raise InputError(f"local image {raw} does not exist") from None
    if not path.is_relative_to(root):
        raise InputError(f"local image {raw} is outside the allowed folder; only files under the folder given "
                         "by --allowed-local-media-path are served")
    if not path.is_file():
        raise InputError(f"local image {raw} is not a file")
    if path.stat().st_size > policy.max_bytes:
        raise InputError(f"local image {raw} is over the server's limit of {policy.max_bytes} bytes")
    return path.read_bytes()
