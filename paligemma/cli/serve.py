"""`paligemma serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn, `pip install .[serve]`).

    paligemma serve                                   # the shipped model on http://127.0.0.1:8000
    paligemma serve --model DIR --port 8080 --api-key KEY --max-batch 8 --quantize int8

Binds 127.0.0.1 unless --host says otherwise. The model loads in the background (GET /health answers 503
until it is ready); a model that fails to load ends the process with one `error:` line and status 1.
SIGTERM (or Ctrl-C) stops accepting requests, lets running ones finish for --shutdown-grace seconds,
then cancels the rest.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError, PaliGemmaError
from .common import non_negative_float as seconds, positive_float
from .common import CliParser, add_model_flags, check_device, model_dir, positive_int

API_KEY_ENV = "PALIGEMMA_API_KEY"


def count(value: str) -> int:
    """A whole number that may be 0."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def port(value: str) -> int:
    n = count(value)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0-65535, got {n}")
    return n


def build_parser(prog: str = "paligemma serve") -> argparse.ArgumentParser:
    p = CliParser(prog=prog, description="Serve a PaliGemma checkpoint over an OpenAI-compatible HTTP API "
                                       "(docs/SERVING.md).")
    add_model_flags(p)
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter (PEFT layout) applied over --model")
    p.add_argument("--served-model-name", help="model id clients send (default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port, default=8000)
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1/ (or set ${API_KEY_ENV})")
    p.add_argument("--vae", help="vae-oid.npz: enables segment masks (COCO RLE)")
    p.add_argument("--max-batch", type=positive_int, default=8, help="rows in the decode batch (default 8)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests waiting for a row before 429 (default 64)")
    p.add_argument("--max-model-len", type=positive_int,
                   help="tokens per row in the KV cache (default: the model's context, at most image tokens + 768)")
    p.add_argument("--max-tokens-default", type=positive_int, default=256,
                   help="new tokens when a request names no max_tokens (default 256, capped by the context)")
    p.add_argument("--max-body-bytes", type=positive_int, default=32 * 2**20, help="request body cap (413)")
    p.add_argument("--request-timeout", type=positive_float, default=600.0, help="seconds per request (504)")
    p.add_argument("--image-cache", type=count, default=32, help="vision-tower outputs kept (LRU; 0 disables)")
    p.add_argument("--shutdown-grace", type=seconds, default=10.0, help="seconds running requests get on SIGTERM")
    p.add_argument("--allow-remote-images", action="store_true", help="accept http(s) image URLs")
    p.add_argument("--allowed-domains", default="", help="comma-separated hosts remote images may come from")
    p.add_argument("--allow-private-addresses", action="store_true",
                   help="remote image URLs may resolve to private/loopback addresses (off: refused)")
    p.add_argument("--fetch-timeout", type=positive_float, default=10.0, help="seconds to fetch a remote image")
    p.add_argument("--max-image-bytes", type=positive_int, default=20 * 2**20, help="bytes per image")
    p.add_argument("--max-image-pixels", type=positive_int, default=50_000_000, help="decoded pixels per image")
    p.add_argument("--allowed-local-media-path", help="serve file:// images from under this folder only")
    p.add_argument("--threads", type=positive_int, help="CPU threads for the model (default: PyTorch's choice)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def config_from_args(args: argparse.Namespace):
    from ..serve.app import ServerConfig
    from ..serve.media import MediaPolicy

    model = model_dir(args.model)
    check_device(args.device)
    if args.vae and not Path(args.vae).is_file():
        raise InputError(f"--vae {args.vae} does not exist; download vae-oid.npz (see README, Tasks)")
    local = None
    if args.allowed_local_media_path:
        local = Path(args.allowed_local_media_path).expanduser()
        if not local.is_dir():
            raise InputError(f"--allowed-local-media-path {local} is not a directory")
    media = MediaPolicy(allow_remote=args.allow_remote_images,
                        allowed_domains=tuple(d.strip().lower() for d in args.allowed_domains.split(",") if d.strip()),
                        allow_private=args.allow_private_addresses, fetch_timeout=args.fetch_timeout,
                        max_bytes=args.max_image_bytes, local_root=local, max_pixels=args.max_image_pixels)
    return ServerConfig(model_dir=model, model_name=args.served_model_name,
                        dtype=args.dtype, device=None if args.device == "auto" else args.device,
                        quantize=None if args.quantize == "none" else args.quantize,
                        adapter=Path(args.adapter) if args.adapter else None,
                        vae=Path(args.vae) if args.vae else None,
                        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                        max_batch=args.max_batch, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                        request_timeout=args.request_timeout, max_model_len=args.max_model_len,
                        default_max_tokens=args.max_tokens_default, image_cache=args.image_cache,
                        shutdown_grace=args.shutdown_grace, media=media)


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound socket for uvicorn. Binding here, not in uvicorn, turns a busy port into an `InputError` (uvicorn
    calls sys.exit while the model loads in a thread, and the process aborts)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise InputError(f"--host {host}: {e.strerror}; pass an address such as 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port") from None
    return sock


def _server_class(on_exit):
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown; a finished graceful stop exits 0.
        The engine starts stopping at the signal (`on_exit`, in a thread): uvicorn's graceful wait comes first
        and cancels what is still running when it ends, with a plain-text 500, before the app's shutdown."""

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()
            threading.Thread(target=on_exit, name="paligemma-stop", daemon=True).start()

    return Server


def main(argv: Sequence[str] | None = None, prog: str = "paligemma serve") -> int:
    """Run the server until SIGTERM/Ctrl-C; 0 on a clean stop, 1 when the model fails to load. Usage and input
    errors raise (`UsageError`, `InputError`) for `paligemma.cli.main` to print as one line."""
    args = build_parser(prog).parse_args(list(sys.argv[1:] if argv is None else argv))
    config = config_from_args(args)
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as e:
        raise InputError(f"paligemma serve needs the serve extra ({e.name} is missing): "
                         "pip install '.[serve]'") from None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_failure(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    sock = listen_socket(args.host, args.port)  # before the model loads: a busy port is one error line
    app = create_app(config, on_load_failure)
    _Server = _server_class(app.state.serve.stop_engine)
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=max(1, int(args.shutdown_grace)) + 1))
    server.run(sockets=[sock])
    if failed:
        raise failed[0] if isinstance(failed[0], PaliGemmaError) else InputError(f"loading the model failed: {failed[0]}")
    return 0
