"""``adapterhub serve``: the AUTOMATIC1111 web API over one loaded base (:mod:`adapterhub.serve`)."""
from __future__ import annotations

import ipaddress
import os
import re
import socket
from pathlib import Path

import click

from adapterhub.errors import AdapterhubError


def _max_size(text: str | None) -> tuple[int, int] | None:
    if text is None or str(text).strip().lower() in ("", "none"):
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 8 or int(m.group(2)) < 8:
        raise AdapterhubError(f"--max-size {text!r}: write it as WIDTHxHEIGHT, e.g. 1024x1024 (or none)")
    return int(m.group(1)), int(m.group(2))


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one); one line if it cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise AdapterhubError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise AdapterhubError(f"{host}:{port}: cannot listen there ({exc.strerror})") from None
    return sock


def _check_catalog(url: str) -> None:
    """The catalog given by --catalog opens (a bad URL, a missing driver: one line now, not at a request)."""
    from adapterhub.catalog import open_catalog

    with open_catalog(url):
        pass


@click.command("serve")
@click.option("--base", required=True,
              help="tiny-sd1, tiny-sdxl, tiny-flux, tiny-sd3, a diffusers folder, a .safetensors checkpoint or a "
                   "hub id.")
@click.option("--backend", default="eager", show_default=True,
              help="A registered sampler backend: eager, compiled (stacks switched without recompiling) ...")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(0, 65535),
              help="Port (the webui's by default; 0: a free one).")
@click.option("--adapter-dir", "adapter_dirs", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of LoRAs, embeddings and hypernetworks (<lora:NAME> looks NAME up here, then the catalog).")
@click.option("--catalog", default=None, metavar="URL",
              help="Catalog to list and look names up in (default: $ADAPTERHUB_CATALOG or ./catalog.db if present).")
@click.option("--api-auth", "api_auth", default=None, metavar="USER:PASS",
              help="HTTP Basic credentials every request must carry (several: USER:PASS,USER:PASS).")
@click.option("--max-queue", default=16, show_default=True, type=click.IntRange(1, None),
              help="Requests that may wait behind the running one; more get 429.")
@click.option("--max-size", default="2048x2048", show_default=True, metavar="WxH",
              help="Largest image (hires target included) a request may ask for; 'none' for no limit.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="Default: fp16 on CUDA, fp32 on CPU.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
def serve_cmd(base, backend, host, port, adapter_dirs, catalog, api_auth, max_queue, max_size, dtype, device):
    """Serve the AUTOMATIC1111 web API (/sdapi/v1/txt2img, img2img, progress, loras ...) for webui clients."""
    try:
        import uvicorn

        from adapterhub.serve.app import Service, create_app, parse_auth
    except ImportError as exc:
        raise AdapterhubError(f"adapterhub serve needs {exc.name}: pip install 'adapterhub[serve]'") from None
    from adapterhub.cli import output
    from adapterhub.sample.generator import Generator

    limit = _max_size(max_size)
    credentials = parse_auth(api_auth)
    if catalog:
        _check_catalog(catalog)
        os.environ["ADAPTERHUB_CATALOG"] = catalog  # <lora:NAME> lookups (adapterhub.names) read this catalog
    if not _loopback(host) and not credentials:
        click.echo(f"warning: listening on {host} without --api-auth: anyone who can reach it can use it", err=True)
    sock = bind(host, port)  # before the model loads: a busy port fails at once
    try:
        output.quiet_model_loading()
        generator = Generator(base, backend=backend, dtype=dtype, device=device,
                              adapter_dirs=[Path(d) for d in adapter_dirs])
        service = Service(generator, adapter_dirs=list(adapter_dirs), catalog=catalog, max_queue=max_queue,
                          max_size=limit, credentials=credentials)
    except BaseException:
        sock.close()
        raise
    bound_host, bound_port = sock.getsockname()[:2]
    click.echo(f"adapterhub serve: {service.model_title} ({backend}) on http://{bound_host}:{bound_port}/sdapi/v1",
               err=True)
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        service.close()
        generator.close()
        sock.close()
