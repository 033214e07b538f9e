"""The dashboard's web app: two pages, their JSON, the model files, and the guards.

Pages are server templates (Jinja2, autoescaped) holding no data of their own; the page's
script (``static/dashboard.js``) polls the JSON API and fills the tables with
``textContent``, so a hospital's name or error message is text whatever it contains. Only
GET routes exist. Guards, in order, for every request:

- the ``Host`` header must be one this dashboard answers to (loopback names by default), so
  a web page elsewhere cannot read it through DNS rebinding;
- with a token: a request must carry it (``Authorization: Bearer``, the session cookie set
  after opening ``/?token=...``, compared in constant time); ``/healthz`` is exempt;
- every response has a Content-Security-Policy that allows only this server's own scripts
  and styles (no inline script runs, even one that slipped into a page), and no framing.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from fedclinic import __version__
from fedclinic.dashboard.runs import RunsRoot, model_files

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
TEMPLATES = HERE / "templates"
COOKIE = "fedclinic_dashboard"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
log = logging.getLogger("fedclinic.dashboard")


@dataclass(frozen=True)
class Settings:
    """What one dashboard serves and how it is guarded."""

    runs: RunsRoot
    #: required on every request when set (never logged, never shown)
    token: str | None = None
    #: Host header values answered to (without port); ``("*",)`` for any
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    #: seconds between the pages' polls while a run goes on
    poll_seconds: float = 2.0
    #: HTTPS: the session cookie is sent over HTTPS only
    secure_cookie: bool = False


def session_value(token: str) -> str:
    """The cookie's value: derived from the token, so the token itself is not stored."""
    return hmac.new(token.encode(), b"fedclinic-dashboard-session", hashlib.sha256).hexdigest()


def same(given: str, expected: str) -> bool:
    """Constant-time comparison (bytes: any characters, no TypeError)."""
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())


def host_of(header: str) -> str:
    """The host of a ``Host`` header, without the port (``[::1]:8080`` -> ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard(BaseHTTPMiddleware):
    """Allowed hosts, the token, and the security headers; see the module docstring."""

    def __init__(self, app: Any, settings: Settings) -> None:
        super().__init__(app)
        self.settings = settings

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await self.check(request, call_next)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    async def check(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        settings = self.settings
        allowed = settings.allowed_hosts
        if "*" not in allowed and host_of(request.headers.get("host", "")) not in allowed:
            return PlainTextResponse("this dashboard does not answer to that host name", 400)
        token = settings.token
        if token is None or request.url.path == "/healthz":
            return await call_next(request)
        given = request.query_params.get("token")
        if given is not None:
            if not same(given, token):
                return denied(request, 403)
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
            response: Response = RedirectResponse(target, status_code=303)
            response.set_cookie(
                COOKIE, session_value(token), httponly=True, samesite="strict", path="/",
                secure=settings.secure_cookie,
            )  # fmt: skip
            return response
        authorization = request.headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            if same(authorization[len("bearer ") :].strip(), token):
                return await call_next(request)
            return denied(request, 403)
        cookie = request.cookies.get(COOKIE)
        if cookie is not None:
            if same(cookie, session_value(token)):
                return await call_next(request)
            return denied(request, 403)
        return denied(request, 401)


def denied(request: Request, status: int) -> Response:
    """401 (no token) or 403 (a wrong one), saying how to get in, never what the token is."""
    message = (
        "this dashboard needs its access token: open it once as /?token=<token> "
        "(the token is in the file or variable the operator gave fedclinic dashboard)"
        if status == 401
        else "wrong access token"
    )
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if request.url.path.startswith("/api/"):
        return Response(
            json.dumps({"error": message}), status, headers, media_type="application/json"
        )
    return PlainTextResponse(message, status, headers)


def json_response(request: Request, data: Any, status: int = 200) -> Response:
    """JSON with an ETag; ``304`` when the page already has this version."""
    body = json.dumps(data, allow_nan=False, separators=(",", ":")).encode()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if status == 200 and request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(body, status, headers, media_type="application/json")


def create_app(settings: Settings) -> Starlette:
    """The dashboard app for ``settings`` (served by uvicorn, or a test client)."""
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
    )
    templates = Jinja2Templates(env=environment)
    runs = settings.runs

    def page(request: Request, name: str, **context: Any) -> Response:
        return templates.TemplateResponse(
            request,
            name,
            {"version": __version__, "poll_ms": int(settings.poll_seconds * 1000), **context},
            headers={"Cache-Control": "no-store"},
        )

    async def runs_page(request: Request) -> Response:
        return page(request, "runs.html", runs_root=str(runs.root.name))

    async def run_page(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        if runs.directory(run_id) is None:
            return PlainTextResponse("no such run", 404)
        return page(request, "run.html", run_id=run_id)

    async def runs_api(request: Request) -> Response:
        return json_response(request, {"runs": runs.listing()})

    async def run_api(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        view = runs.view(run_id) if runs.directory(run_id) is not None else None
        if view is None:
            return json_response(request, {"error": "no such run (yet)"}, 404)
        return json_response(request, view)

    async def model(request: Request) -> Response:
        run_id, name = request.path_params["run_id"], request.path_params["name"]
        directory = runs.directory(run_id)
        if directory is None or not directory.is_dir():
            return PlainTextResponse("no such run", 404)
        if name not in model_files(runs.files(run_id).summary):
            return PlainTextResponse("no such model", 404)
        path = directory / name
        if not path.is_file() or path.resolve().parent != directory.resolve():
            return PlainTextResponse("no such model", 404)
        return FileResponse(path, filename=name, media_type="application/octet-stream")

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    routes = [
        Route("/", runs_page),
        Route("/runs/{run_id}", run_page),
        Route("/runs/{run_id}/models/{name}", model),
        Route("/api/runs", runs_api),
        Route("/api/runs/{run_id}", run_api),
        Route("/healthz", healthz),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(Guard, settings=settings)])


def allowed_hosts(host: str, extra: Sequence[str], guarded: bool) -> tuple[str, ...]:
    """Loopback names when bound to loopback; any name when bound elsewhere and guarded (a
    token or client certificates); ``extra`` names narrow that, or add to loopback's."""
    if extra:
        return (*LOOPBACK_HOSTS, *(h.lower() for h in extra))
    if guarded and not is_loopback(host):
        return ("*",)
    return LOOPBACK_HOSTS


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
