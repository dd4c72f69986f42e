"""`search serve`: check the options, bind the socket, join Ray, then hand over to uvicorn and the
service's app (search.service.app)."""
from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Optional

import typer

from common.errors import first_line
from search.cli.console import CliError, err, guarded
from search.cli.options import TOKEN_ENV, DbOption, default_db

MIN_TOKEN_LENGTH = 16
TOKEN_HINT = "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@guarded
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind; anything but loopback needs --token"),
    port: int = typer.Option(8765, "--port", help="TCP port"),
    db: Optional[Path] = DbOption,
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", envvar="MBP_SEARCH_DATA_DIR",
                                            help="where the service writes plots and progress [default: <db>.service/]"),
    token: Optional[str] = typer.Option(None, "--token", envvar=TOKEN_ENV,
                                        help="clients must send it as a bearer token"),
    allow_model_dir: list[Path] = typer.Option([], "--allow-model-dir",
                                               help="a directory whose pipelines remote requests may name by path "
                                                    "(repeatable)"),
    allow_images_dir: list[Path] = typer.Option([], "--allow-images-dir",
                                                help="a directory under which remote image-to-image requests may name "
                                                     "an images_dir by path (repeatable); without it clients send "
                                                     "the images themselves"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS",
                                              help="the cluster to run drivers on [default: start a local instance]"),
    resume_interrupted: bool = typer.Option(True, "--resume-interrupted/--no-resume-interrupted",
                                            help="at start-up, resume searches that were interrupted"),
    request_gpus: int = typer.Option(0, "--request-gpus", help="ask the Ray autoscaler for this many GPUs while "
                                     "searches run, and wait for the first one (clusters whose GPU workers scale from 0)"),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level"),
) -> None:
    """Run the search service: an HTTP API (OpenAPI at /docs) to submit, watch, resume, cancel and download."""
    import socket

    from storage.engine import check_database_file

    if not _is_loopback(host) and not token:
        raise CliError(f"--host {host} is reachable from other machines: set a token with --token or {TOKEN_ENV} "
                       + TOKEN_HINT)
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise CliError(f"the token is too short: use at least {MIN_TOKEN_LENGTH} characters " + TOKEN_HINT)
    if not 0 <= port <= 65535:
        raise CliError(f"--port must be between 0 and 65535, got {port}")
    if request_gpus < 0:
        raise CliError(f"--request-gpus must be 0 or more, got {request_gpus}")
    for d in allow_model_dir:
        if not d.expanduser().is_dir():
            raise CliError(f"--allow-model-dir {d} is not a directory")
    for d in allow_images_dir:
        if not d.expanduser().is_dir():
            raise CliError(f"--allow-images-dir {d} is not a directory")
    db_path = (db or default_db()).expanduser()
    check_database_file(db_path)
    data_dir = (data_dir or db_path.with_name(db_path.name + ".service")).expanduser()
    if data_dir.exists() and not data_dir.is_dir():
        raise CliError(f"--data-dir {data_dir} is not a directory")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None

    import uvicorn

    from search.service.app import create_app

    api = create_app(db_path, data_dir, token=token, allowed_model_dirs=allow_model_dir, ray_address=ray_address,
                     resume_interrupted=resume_interrupted, request_gpus=request_gpus,
                     allowed_images_dirs=allow_images_dir)
    service = api.state.service
    try:
        service.start()  # join Ray and resume interrupted searches before taking requests
    except (ConnectionError, RuntimeError, ValueError) as exc:
        sock.close()
        raise CliError(f"cannot start the Ray connection ({ray_address or 'local'}): {first_line(exc)}") from None
    bound = sock.getsockname()[1]
    err.print(f"search service on http://{host}:{bound} (OpenAPI /docs); database {db_path}; data {data_dir}; "
              f"{service.describe_ray()}; token {'required' if token else 'not required (loopback only)'}",
              highlight=False, soft_wrap=True)
    config = uvicorn.Config(api, host=host, port=bound, log_level=log_level, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
