"""Image inputs of the server, one row per input (llama.cpp's server-test idea): what is accepted, and for
each refusal the message that names it. Remote fetches go to a local HTTP server on 127.0.0.1 only."""

import base64
import http.server
import io
import threading

import pytest
from PIL import Image

from paligemma.errors import InputError
from paligemma.serve.media import MediaPolicy, check_remote_url, load_image_url


def png_bytes(size=(8, 6), color=(255, 0, 0), fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt, **kw)
    return buf.getvalue()


def data_uri(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def gif_two_frames() -> bytes:
    buf = io.BytesIO()
    frames = [Image.new("RGB", (4, 4), (0, 0, 255)), Image.new("RGB", (4, 4), (0, 255, 0))]
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_data_uris_decode(fmt, mime):
    img = load_image_url(data_uri(png_bytes(fmt=fmt), mime), MediaPolicy())
    r, g, b = img.convert("RGB").getpixel((3, 3))
    assert img.size == (8, 6) and r > 240 and g < 15 and b < 15


def test_gif_gives_its_first_frame():
    img = load_image_url(data_uri(gif_two_frames(), "image/gif"), MediaPolicy()).convert("RGB")
    assert img.getpixel((0, 0)) == (0, 0, 255)


def pixel_bomb() -> bytes:
    """A 6000 x 6000 PNG of a few KB: the header alone must stop it."""
    buf = io.BytesIO()
    Image.new("1", (6000, 6000)).save(buf, "PNG")
    return buf.getvalue()


BAD = [
    ("bad base64", data_uri(b"x")[:-4] + "!!!!", "base64 is malformed"),
    ("not an image", data_uri(b"hello, this is text, not a picture"), "not a PNG, JPEG, WebP or GIF"),
    ("truncated png", data_uri(png_bytes((64, 64))[:60]), "could not be"),
    ("not base64", "data:image/png,abc", "not base64"),
    ("wrong media type", "data:text/plain;base64,aGk=", "not an image"),
    ("raw base64", base64.b64encode(png_bytes() * 4).decode(), "wrap it as a data URI"),
    ("unknown scheme", "ftp://example.com/a.png", "unsupported image URL scheme"),
    ("remote off", "http://example.com/a.png", "remote image URLs are disabled"),
    ("local off", "file:///etc/passwd", "local image files are disabled"),
    ("empty", "", "empty"),
]


@pytest.mark.parametrize("url,message", [(u, m) for _, u, m in BAD], ids=[n for n, _, _ in BAD])
def test_refused_inputs(url, message):
    with pytest.raises(InputError, match=message):
        load_image_url(url, MediaPolicy())


def test_pixel_bomb_is_refused_from_its_header():
    with pytest.raises(InputError, match="6000x6000 = 36000000 pixels, over the server's limit of 10000000"):
        load_image_url(data_uri(pixel_bomb()), MediaPolicy(max_pixels=10_000_000))


def test_byte_cap():
    with pytest.raises(InputError, match="over the server's limit of 100 bytes"):
        load_image_url(data_uri(png_bytes((64, 64))), MediaPolicy(max_bytes=100))


def test_local_files_stay_inside_the_allowed_folder(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (root / "ok.png").write_bytes(png_bytes())
    (tmp_path / "secret.png").write_bytes(png_bytes())
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    policy = MediaPolicy(local_root=root)
    assert load_image_url(f"file://{root}/ok.png", policy).size == (8, 6)
    assert load_image_url(str(root / "ok.png"), policy).size == (8, 6)
    for url in (f"file://{root}/../secret.png", f"file://{root}/link.png", f"file://{tmp_path}/secret.png"):
        with pytest.raises(InputError, match="outside the allowed folder"):
            load_image_url(url, policy)
    with pytest.raises(InputError, match="does not exist"):
        load_image_url(f"file://{root}/missing.png", policy)


@pytest.fixture(scope="module")
def image_server():
    """127.0.0.1 HTTP server: /a.png, /redirect (same host), /away (another host), /big, /text."""
    body = png_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            routes = {"/a.png": (200, body, {}), "/redirect": (302, b"", {"Location": "/a.png"}),
                      "/away": (302, b"", {"Location": "http://localhost:1/a.png"}),
                      "/big": (200, b"\0" * 5000, {}), "/text": (200, b"hello", {})}
            status, data, headers = routes.get(self.path, (404, b"", {}))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_remote_images_when_allowed(image_server):
    policy = MediaPolicy(allow_remote=True, allow_private=True, fetch_timeout=5, max_bytes=1000)
    assert load_image_url(image_server + "/a.png", policy).size == (8, 6)
    assert load_image_url(image_server + "/redirect", policy).size == (8, 6)
    for path, message in [("/away", "redirects to another host"), ("/big", "over the server's limit of 1000"),
                          ("/text", "not a PNG"), ("/missing", "HTTP 404")]:
        with pytest.raises(InputError, match=message):
            load_image_url(image_server + path, policy)


def test_remote_loopback_and_unlisted_hosts_are_refused(image_server):
    with pytest.raises(InputError, match="private or loopback address"):
        load_image_url(image_server + "/a.png", MediaPolicy(allow_remote=True))
    with pytest.raises(InputError, match="private or loopback address"):
        check_remote_url("http://10.1.2.3/a.png", MediaPolicy(allow_remote=True))
    with pytest.raises(InputError, match="not in the server's allowed domains"):
        check_remote_url("http://evil.example.org/a.png", MediaPolicy(allow_remote=True, allowed_domains=("example.com",)))
    assert check_remote_url("http://cdn.example.com/a.png",
                            MediaPolicy(allow_remote=True, allow_private=True, allowed_domains=("example.com",)))
