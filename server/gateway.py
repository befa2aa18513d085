"""The gateway: what sites reach at ftserver's ``--host/--port``. It serves the Fleet API and
nothing else.

Flower 1.42's SuperLink answers its Fleet API (what SuperNodes use), its Control API
(register and unregister nodes, start, stop and list runs: unauthenticated in the open-source
SuperLink) and its Runtime API (hands ServerApp tasks out) on ONE listener. So ftserver binds
the SuperLink to 127.0.0.1 on a free port and puts this process in front of it:

- it forwards ``POST`` to the exact paths of Flower's Fleet router
  (``flwr/superlink/routers/fleet/router.py``, :data:`FLEET_PATHS`; a unit test keeps the two
  equal) and refuses everything else without forwarding it: 404 for any other path, query
  string, percent-encoded or dot-segment spelling, 405 for another method;
- it refuses a body whose ``Content-Length`` is above ``--max-body-mb`` (413) before reading
  any of it, and stops a chunked body the moment it passes that size;
- it strips hop-by-hop headers (and any ``X-Forwarded-*``/``Forwarded`` a caller sent; it sets
  ``X-Forwarded-For`` itself), passes every other header (Flower's node-auth signature,
  timestamp and version headers) through, and hands back Flower's status and body unchanged;
- it talks to the SuperLink over TLS and verifies its certificate with ``ca.crt`` (under
  ``--insecure``, plain HTTP on both sides; the path filter stays).

Built from uvicorn (HTTP parsing and TLS), Starlette (routing) and httpx (the upstream client),
which flwr already installs. It logs refusals and upstream failures, not routine traffic
(a SuperNode polls every half second).

    python -m fedtune.server.gateway --host 0.0.0.0 --port 8000 --upstream https://127.0.0.1:PORT \\
        --ca-cert ca.crt --certfile server.crt --keyfile server.key [--max-body-mb 64]
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import ssl
import sys
from urllib.parse import urlsplit

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, Router

# The Fleet API of flwr 1.42 (pinned <1.43), every route of its router: what a SuperNode calls.
# register-node/unregister-node are how a SuperNode without a site key enrols itself
# (--insecure); with site authentication on, Flower itself refuses both.
FLEET_PATHS = (
    "/v1/fleet/register-node",
    "/v1/fleet/activate-node",
    "/v1/fleet/deactivate-node",
    "/v1/fleet/unregister-node",
    "/v1/fleet/send-node-heartbeat",
    "/v1/fleet/pull-messages",
    "/v1/fleet/push-messages",
    "/v1/fleet/get-run",
    "/v1/fleet/get-fab",
    "/v1/fleet/push-object",
    "/v1/fleet/pull-object",
    "/v1/fleet/confirm-message-received",
)
# Flower sends each array in chunks of at most 5 MiB (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE), one
# push-object request each, so the largest request of even a full fine-tuning of the default
# model is about 5 MiB; 64 MB leaves room and still bounds what one request can make the
# SuperLink hold in memory.
DEFAULT_MAX_BODY_MB = 64
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Never taken from a caller: the gateway says who the caller is, and the length is its own.
NOT_FORWARDED = HOP_BY_HOP | {
    "host",
    "content-length",
    "expect",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
}

log = logging.getLogger("fedtune.gateway")


class BodyTooLarge(Exception):
    pass


def _refuse(request: Request, status: int, why: str) -> Response:
    client = request.client.host if request.client else "?"
    raw = request.scope.get("raw_path") or request.scope.get("path", "").encode()
    query = request.scope.get("query_string") or b""
    target = raw + (b"?" + query if query else b"")
    log.warning("refused %s %r from %s: %d %s", request.method, target[:200], client, status, why)
    return PlainTextResponse(why, status_code=status)


def _drop_listed_in_connection(headers) -> set[str]:
    return {t.strip().lower() for v in headers for t in v.split(",") if t.strip()}


def upstream_client(
    upstream: str, verify: ssl.SSLContext | bool, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The client the gateway reaches the SuperLink with (one per app, opened by its lifespan)."""
    return httpx.AsyncClient(
        base_url=upstream,
        verify=verify,
        transport=transport,
        trust_env=False,  # never an HTTP(S)_PROXY from the environment between us and loopback
        follow_redirects=False,
        timeout=httpx.Timeout(connect=10.0, read=600.0, write=600.0, pool=60.0),
        limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
    )


def _refusal(request: Request, max_body: int) -> Response | None:
    """What is refused before anything is read or forwarded (the method, the path's spelling, the
    declared length) -> the refusal, or None for a request to forward."""
    path = request.scope["path"]
    if request.method != "POST":
        return _refuse(request, 405, "Method Not Allowed")
    # Routing matched the decoded path; the bytes on the wire must be that path exactly
    # (no %-escapes, no query), and what goes upstream is our own constant, not theirs.
    if request.scope.get("raw_path", path.encode()) != path.encode("ascii") or request.scope.get("query_string"):
        return _refuse(request, 404, "Not Found")
    lengths = request.headers.getlist("content-length")
    if lengths:
        if len(set(lengths)) != 1 or not lengths[0].strip().isdigit():
            return _refuse(request, 400, "bad Content-Length")
        if int(lengths[0]) > max_body:
            return _refuse(request, 413, f"request body over {max_body} bytes")
    return None


def _upstream_headers(request: Request) -> list[tuple[str, str]]:
    """The caller's headers less hop-by-hop and NOT_FORWARDED ones, with the gateway's own
    Content-Length (the one _refusal checked) and X-Forwarded-For."""
    drop = NOT_FORWARDED | _drop_listed_in_connection(request.headers.getlist("connection"))
    headers = [(k, v) for k, v in request.headers.items() if k not in drop]
    lengths = request.headers.getlist("content-length")
    if lengths:
        headers.append(("content-length", lengths[0].strip()))
    if request.client:
        headers.append(("x-forwarded-for", request.client.host))
    return headers


async def _capped_body(request: Request, max_body: int):
    """The request's body as it arrives; BodyTooLarge the moment it passes max_body (a chunked
    body declares no length for _refusal to check)."""
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > max_body:
            raise BodyTooLarge
        if chunk:
            yield chunk


async def _forward(client: httpx.AsyncClient, request: Request, max_body: int) -> Response:
    """Send a request _refusal let through to the SuperLink -> its answer, relayed; 413 for a body
    that grew past the cap on the way, 504/502 when the SuperLink times out or can't be reached."""
    path = request.scope["path"]
    body = _capped_body(request, max_body)
    upstream_request = client.build_request("POST", path, headers=_upstream_headers(request), content=body)
    try:
        resp = await client.send(upstream_request, stream=True)
    except BodyTooLarge:
        return _refuse(request, 413, f"request body over {max_body} bytes")
    except httpx.TimeoutException as e:
        log.error("upstream timeout on %s: %s", path, type(e).__name__)
        return PlainTextResponse("upstream timeout", status_code=504)
    except httpx.TransportError as e:
        log.error("upstream unreachable on %s: %s: %s", path, type(e).__name__, e)
        return PlainTextResponse("upstream unreachable", status_code=502)
    return _relayed(resp)


def _relayed(resp: httpx.Response) -> StreamingResponse:
    """The SuperLink's answer streamed back as it came: its status, its body, its headers less
    hop-by-hop ones."""
    drop = HOP_BY_HOP | _drop_listed_in_connection(resp.headers.get_list("connection"))

    async def relay():
        try:
            async for chunk in resp.aiter_raw():
                yield chunk
        finally:
            await resp.aclose()

    out = StreamingResponse(relay(), status_code=resp.status_code, background=BackgroundTask(resp.aclose))
    # Raw bytes (no decoding), so the upstream's content-length/-encoding still hold.
    out.raw_headers = [
        (k.lower().encode("latin-1"), v.encode("latin-1"))
        for k, v in resp.headers.multi_items()
        if k.lower() not in drop
    ]
    return out


async def _not_found(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    await _refuse(Request(scope), 404, "Not Found")(scope, receive, send)


def build_app(
    upstream: str, verify: ssl.SSLContext | bool, max_body: int, transport: httpx.AsyncBaseTransport | None = None
) -> Router:
    """The gateway as an ASGI app: Fleet API paths forwarded to ``upstream``, all else refused."""
    client: dict[str, httpx.AsyncClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        client["c"] = upstream_client(upstream, verify, transport)
        try:
            yield
        finally:
            await client["c"].aclose()

    async def forward(request: Request) -> Response:
        refused = _refusal(request, max_body)
        return refused if refused is not None else await _forward(client["c"], request, max_body)

    # Every method reaches forward, which refuses (and logs) all but POST.
    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"]
    routes = [Route(p, forward, methods=methods) for p in FLEET_PATHS]
    return Router(routes=routes, redirect_slashes=False, default=_not_found, lifespan=lifespan)


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fedtune.server.gateway",
        description="Serve Flower's Fleet API, and only it, in front of a loopback SuperLink.",
    )
    p.add_argument("--host", required=True, help="address sites reach (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument(
        "--upstream", required=True, help="the SuperLink, on loopback: https://127.0.0.1:PORT (http:// with --insecure)"
    )
    p.add_argument("--ca-cert", help="CA that signed the SuperLink's certificate (verifies the upstream)")
    p.add_argument("--certfile", help="this endpoint's TLS certificate (server.crt)")
    p.add_argument("--keyfile", help="this endpoint's TLS key (server.key)")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plain HTTP on both sides (test networks only); paths are still filtered",
    )
    p.add_argument(
        "--max-body-mb",
        type=float,
        default=DEFAULT_MAX_BODY_MB,
        help=f"largest request body accepted (default {DEFAULT_MAX_BODY_MB} MB)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=1000,
        help="open connections and requests at once; more get 503 (default 1000)",
    )
    args = p.parse_args(argv)
    if not _loopback(args.upstream):
        p.error(f"--upstream {args.upstream}: the SuperLink must be on loopback (127.0.0.1)")
    want = "http" if args.insecure else "https"
    if urlsplit(args.upstream).scheme != want:
        p.error(
            f"--upstream {args.upstream}: expected {want}://"
            + (" (--insecure)" if args.insecure else " (TLS; --insecure for plain HTTP)")
        )
    if not args.insecure and not (args.ca_cert and args.certfile and args.keyfile):
        p.error("TLS: --ca-cert, --certfile and --keyfile are required (or --insecure)")
    if not args.max_body_mb > 0:
        p.error("--max-body-mb: expected a positive size")
    return args


def server_config(
    app, host: str, port: int, certfile: str | None = None, keyfile: str | None = None, max_connections: int = 1000
):
    """uvicorn's settings for the gateway: h11 (strict parsing), no websockets, no trust in a
    caller's X-Forwarded-* (proxy_headers off), no access log, no server banner."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
        http="h11",
        ws="none",
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        limit_concurrency=max_connections,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=5,
    )


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    for noisy in ("httpx", "httpcore"):  # one line per forwarded request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    verify: ssl.SSLContext | bool = False
    if not args.insecure:
        verify = ssl.create_default_context(cafile=args.ca_cert)
    app = build_app(args.upstream.rstrip("/"), verify, int(args.max_body_mb * 1_000_000))
    config = server_config(
        app,
        args.host,
        args.port,
        None if args.insecure else args.certfile,
        None if args.insecure else args.keyfile,
        args.max_connections,
    )
    log.info(
        "serving the Fleet API on %s:%d (%s) -> %s; body cap %.0f MB; every other path refused",
        args.host,
        args.port,
        "plain HTTP" if args.insecure else "TLS",
        args.upstream,
        args.max_body_mb,
    )
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
