"""What both reference services need: a bearer-token check and a command line that serves
an app with uvicorn (so tests start them as real processes)."""

from __future__ import annotations

import argparse
import hmac
import os
from collections.abc import Callable, Sequence

import uvicorn
from fastapi import FastAPI, HTTPException, Request


def bearer_guard(token: str) -> Callable[[Request], None]:
    """A FastAPI dependency refusing requests without `Authorization: Bearer <token>`."""
    expected = f"Bearer {token}".encode()

    def require_token(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_token


def serve_from_command_line(
    description: str,
    token_env: str,
    build: Callable[[argparse.Namespace], FastAPI],
    argv: Sequence[str] | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    prog: str | None = None,
) -> None:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument(
        "--token",
        default=os.environ.get(token_env),
        help=f"bearer token clients must send (default: ${token_env})",
    )
    parser.add_argument("--log-level", default="warning", help="uvicorn log level (warning)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if not args.token:
        parser.error(f"--token or ${token_env} is required")
    uvicorn.run(
        build(args),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        # A "slow" decision service holds requests open; stopping must not wait for them.
        timeout_graceful_shutdown=1,
    )
