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
import sys
from collections.abc import Sequence
from pathlib import Path

from .. import SHAPES_TINY
from ..errors import InputError
from .media import MediaPolicy

API_KEY_ENV = "PALIGEMMA_API_KEY"


class UsageError(Exception):
    """A command-line mistake: exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def _positive(kind):
    def parse(value: str):
        try:
            n = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
        if n <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {value}")
        return n
    return parse


def build_parser(prog: str = "paligemma serve") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Serve a PaliGemma checkpoint over an OpenAI-compatible HTTP API "
                                       "(docs/SERVING.md).")
    p.add_argument("--model", default=str(SHAPES_TINY), help="checkpoint directory (default: the shipped shapes-tiny)")
    p.add_argument("--served-model-name", help="model id clients send (default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1/ (or set ${API_KEY_ENV})")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="activation dtype (default: per device)")
    p.add_argument("--quantize", default="auto", choices=["auto", "none", "int8", "bf16", "fp32"],
                   help="weight format (paligemma.load's quantize=)")
    p.add_argument("--vae", help="vae-oid.npz: enables segment masks (COCO RLE)")
    p.add_argument("--max-batch", type=_positive(int), default=8, help="rows in the decode batch (default 8)")
    p.add_argument("--max-queue", type=_positive(int), default=64,
                   help="requests waiting for a row before 429 (default 64)")
    p.add_argument("--max-model-len", type=_positive(int),
                   help="tokens per row in the KV cache (default: the model's context, at most image tokens + 768)")
    p.add_argument("--max-tokens-default", type=_positive(int), default=256,
                   help="new tokens when a request names no max_tokens (default 256, capped by the context)")
    p.add_argument("--max-body-bytes", type=_positive(int), default=32 * 2**20, help="request body cap (413)")
    p.add_argument("--request-timeout", type=_positive(float), default=600.0, help="seconds per request (504)")
    p.add_argument("--image-cache", type=int, default=32, help="vision-tower outputs kept (LRU; 0 disables)")
    p.add_argument("--shutdown-grace", type=float, default=10.0, help="seconds running requests get on SIGTERM")
    p.add_argument("--allow-remote-images", action="store_true", help="accept http(s) image URLs")
    p.add_argument("--allowed-domains", default="", help="comma-separated hosts remote images may come from")
    p.add_argument("--allow-private-addresses", action="store_true",
                   help="remote image URLs may resolve to private/loopback addresses (off: refused)")
    p.add_argument("--fetch-timeout", type=_positive(float), default=10.0, help="seconds to fetch a remote image")
    p.add_argument("--max-image-bytes", type=_positive(int), default=20 * 2**20, help="bytes per image")
    p.add_argument("--max-image-pixels", type=_positive(int), default=50_000_000, help="decoded pixels per image")
    p.add_argument("--allowed-local-media-path", help="serve file:// images from under this folder only")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def config_from_args(args: argparse.Namespace):
    from .app import ServerConfig

    model = Path(args.model).expanduser()
    if not (model / "config.json").is_file():
        raise InputError(f"--model {model}: no config.json there; pass a PaliGemma checkpoint directory")
    if args.vae and not Path(args.vae).is_file():
        raise InputError(f"--vae {args.vae} does not exist; download vae-oid.npz (see README, Tasks)")
    local = None
    if args.allowed_local_media_path:
        local = Path(args.allowed_local_media_path).expanduser()
        if not local.is_dir():
            raise InputError(f"--allowed-local-media-path {local} is not a directory")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device cuda: CUDA is not available on this machine; use --device cpu or auto")
    media = MediaPolicy(allow_remote=args.allow_remote_images,
                        allowed_domains=tuple(d.strip().lower() for d in args.allowed_domains.split(",") if d.strip()),
                        allow_private=args.allow_private_addresses, fetch_timeout=args.fetch_timeout,
                        max_bytes=args.max_image_bytes, local_root=local, max_pixels=args.max_image_pixels)
    return ServerConfig(model_dir=model, model_name=args.served_model_name,
                        dtype=args.dtype, device=None if args.device == "auto" else args.device,
                        quantize=None if args.quantize == "none" else args.quantize,
                        vae=Path(args.vae) if args.vae else None,
                        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                        max_batch=args.max_batch, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                        request_timeout=args.request_timeout, max_model_len=args.max_model_len,
                        default_max_tokens=args.max_tokens_default, image_cache=args.image_cache,
                        shutdown_grace=args.shutdown_grace, media=media)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGTERM/Ctrl-C; 0 on a clean stop, 1 when the model fails to load, 2 on usage."""
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        config = config_from_args(args)
        import uvicorn

        from .app import create_app
    except UsageError as e:
        print(f"error: {e} (see `paligemma serve --help`)", file=sys.stderr)
        return 2
    except (InputError, ImportError) as e:
        hint = " (install the extra: pip install '.[serve]')" if isinstance(e, ImportError) else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 1
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_failure(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(config, on_load_failure)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=max(1, int(args.shutdown_grace)) + 1))
    server.run()
    if failed:
        print(f"error: {' '.join(str(failed[0]).split()) or type(failed[0]).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
