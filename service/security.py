"""The web page's defences against a hostile site and a hostile tenant:
framing, cross-site requests, DNS rebinding, a session cookie that is not the API key, and a
rate limit on sign-in. Installed by ``create_app`` with ``add_security(app)``.

- Every response: ``X-Frame-Options: DENY`` (``SAMEORIGIN`` for a response whose own CSP lets
  the same origin frame it: the report, which the job page shows in a frame),
  ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: same-origin`` and, unless the route
  set its own, ``Content-Security-Policy: frame-ancestors 'none'``. The web pages set
  ``PAGE_CSP`` (scripts and styles from this origin only, no inline script).
- Keyless mode (no ``CLCALIB_API_KEYS``): only a Host of ``127.0.0.1``, ``localhost`` or
  ``[::1]`` (any port) or one of ``CLCALIB_ALLOWED_HOSTS`` is answered, so a DNS-rebinding page
  (``evil.example`` resolving to 127.0.0.1) gets 403 ``host_not_allowed``.
- A POST/PUT/PATCH/DELETE without ``Authorization: Bearer`` (a browser's: cookie-authenticated,
  or anything in keyless mode) must come from this origin: an ``Origin`` (else ``Referer``) of
  another origin, ``Origin: null``, or ``Sec-Fetch-Site: cross-site/same-site`` is 403
  ``cross_origin``. A signed-in browser's request must also carry its session's CSRF token
  (header ``X-CSRF-Token``, or the form field ``csrf_token`` on /login and /logout, which check
  it themselves), and so must a keyless browser's that sent no Origin: 403 ``csrf_failed``
  otherwise. A request with none of Origin, Referer, Sec-Fetch-Site or the page's cookies is a
  program (the CLI, curl) and needs neither.
- Sessions: sign-in stores a random id (``secrets.token_urlsafe``) in the cookie, mapped to the
  tenant in this process's memory (``Sessions``), with an expiry; sign-out drops it.
- Sign-in is rate limited per client address (``LoginLimiter``: ``LOGIN_MAX_FAILURES`` failed
  keys per ``LOGIN_WINDOW_S``, then 429 with Retry-After), and so are API keys sent as
  ``Authorization: Bearer`` (``service.deps.get_tenant``): both count in the same limiter.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ErrorBody

# the one place that holds the sign-in limit: failed keys per client address per window
LOGIN_MAX_FAILURES = 10
LOGIN_WINDOW_S = 60.0
SESSION_TTL_S = 12 * 3600.0  # a sign-in lasts this long (the cookie's Max-Age and the server's expiry)
SESSIONS_PER_TENANT = 50  # a tenant's oldest session is dropped past this: memory is bounded by the key list

SESSION_COOKIE = "clcalib_session"  # the sign-in: a random session id, never the API key
CSRF_COOKIE = "clcalib_csrf"  # the token of a browser that is not signed in (the sign-in form, keyless mode)
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
FORM_ROUTES = frozenset({"/login", "/logout"})  # these read the token from their form body themselves
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})

PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; frame-src 'self'; object-src 'none'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'")
DEFAULT_CSP = "frame-ancestors 'none'"


# --- sessions -------------------------------------------------------------------------------

@dataclass
class Session:
    tenant: str
    expires: float  # wall-clock seconds
    csrf: str


class Sessions:
    """Sign-in sessions of this API process, in memory: the cookie holds a random id, the map
    holds its tenant, expiry and CSRF token (keyed by the id's SHA-256, so memory holds no
    usable cookie). A restart signs everyone out; several API replicas need sticky sessions.
    Chosen over a signed cookie because sign-out really ends a session here (a signed value
    stays valid until it expires, wherever it was copied to)."""

    def __init__(self, ttl_s: float = SESSION_TTL_S, per_tenant: int = SESSIONS_PER_TENANT, clock=time.time):
        self.ttl_s, self.per_tenant, self.clock = ttl_s, per_tenant, clock
        self._d: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()  # for a caller in the threadpool (a sync route; get_tenant is async)

    @staticmethod
    def _key(sid: str) -> str:
        return hashlib.sha256(sid.encode("utf-8", "replace")).hexdigest()

    def create(self, tenant: str) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        with self._lock:
            now = self.clock()
            for k in [k for k, s in self._d.items() if s.expires <= now]:
                del self._d[k]
            mine = [k for k, s in self._d.items() if s.tenant == tenant]
            for k in mine[: max(0, len(mine) - self.per_tenant + 1)]:  # oldest first (insertion order)
                del self._d[k]
            s = Session(tenant=tenant, expires=now + self.ttl_s, csrf=secrets.token_urlsafe(32))
            self._d[self._key(sid)] = s
        return sid, s

    def get(self, sid: str | None) -> Session | None:
        if not sid or len(sid) > 200:
            return None
        k = self._key(sid)
        with self._lock:
            s = self._d.get(k)
            if s is not None and s.expires <= self.clock():
                del self._d[k]
                return None
        return s

    def drop(self, sid: str | None) -> None:
        if sid:
            with self._lock:
                self._d.pop(self._key(sid), None)

    def __len__(self) -> int:
        return len(self._d)


def session_of(request: Request) -> Session | None:
    """The request's signed-in session from its cookie, or None."""
    return request.app.state.sessions.get(request.cookies.get(SESSION_COOKIE))


def csrf_token(request: Request, signed_in: bool = True) -> tuple[str, bool]:
    """(the CSRF token a page served to this request embeds, whether the CSRF cookie must be set
    on the response). Signed in: the session's token; otherwise (and on the sign-in form) the
    CSRF cookie's (a new one if the browser has none)."""
    if signed_in and request.app.state.settings.api_keys:
        s = session_of(request)
        if s is not None:
            return s.csrf, False
    tok = request.cookies.get(CSRF_COOKIE)
    if tok and 20 <= len(tok) <= 100:
        return tok, False
    return secrets.token_urlsafe(32), True


def set_csrf_cookie(request: Request, response, token: str) -> None:
    response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")


def _expected_csrf(request: Request) -> str | None:
    """The token a request must carry, or None when none is asked. Signed in (the cookie is the
    credential): always the session's. Keyless: a browser's request that sent no Origin (an
    Origin, already checked, proves the page is ours); a program's (no Origin, Referer,
    Sec-Fetch-Site or cookie: the CLI) needs none. Keyed without a session: get_tenant answers 401."""
    h = request.headers
    if request.app.state.settings.api_keys:
        s = session_of(request)
        return s.csrf if s is not None else None
    if h.get("origin") is None and (request.cookies.get(CSRF_COOKIE) or h.get("referer") is not None
                                    or h.get("sec-fetch-site") is not None):
        return request.cookies.get(CSRF_COOKIE) or ""
    return None


def csrf_ok(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(expected.encode(), given.encode())


def check_form_csrf(request: Request, given: str | None, signed_in: bool) -> bool:
    """/logout (``signed_in``): the form's token against the session's; /login: against the
    CSRF cookie's (double submit: another site can neither read the cookie nor set it)."""
    s = session_of(request) if signed_in and request.app.state.settings.api_keys else None
    return csrf_ok(s.csrf if s is not None else request.cookies.get(CSRF_COOKIE), given)


# --- sign-in rate limit ---------------------------------------------------------------------

class LoginLimiter:
    """At most ``max_failures`` failed keys per client address in any ``window_s``, typed into
    the sign-in form or sent as Authorization: Bearer; past it, every sign-in and every Bearer
    request from that address (the right key too) is 429 until the oldest failure leaves the
    window. A success does not reset the count (a tenant with a key of its own could otherwise
    reset it between guesses). IPv6 clients count per /64. Used from the event loop only (the
    sign-in route and get_tenant are async): no lock."""

    def __init__(self, max_failures: int = LOGIN_MAX_FAILURES, window_s: float = LOGIN_WINDOW_S,
                 clock=time.monotonic, max_clients: int = 10000):
        self.max_failures, self.window_s, self.clock, self.max_clients = max_failures, window_s, clock, max_clients
        self._fails: dict[str, deque[float]] = {}

    @staticmethod
    def client(request: Request) -> str:
        host = request.client.host if request.client else ""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return host
        if ip.version == 6 and not ip.is_loopback:
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(ip)

    def _recent(self, who: str, now: float) -> deque[float]:
        q = self._fails.get(who)
        if q is None:
            return deque()
        while q and q[0] <= now - self.window_s:
            q.popleft()
        if not q:
            del self._fails[who]
        return q

    def retry_after(self, who: str) -> int | None:
        """Seconds until ``who`` may try again, or None when it may now."""
        now = self.clock()
        q = self._recent(who, now)
        if len(q) < self.max_failures:
            return None
        return max(1, math.ceil(q[0] + self.window_s - now))

    def failed(self, who: str) -> None:
        now = self.clock()
        if who not in self._fails and len(self._fails) >= self.max_clients:
            for k in list(self._fails):
                self._recent(k, now)
            if len(self._fails) >= self.max_clients:
                self._fails.pop(next(iter(self._fails)))
        self._fails.setdefault(who, deque()).append(now)


# --- origin and host checks -----------------------------------------------------------------

def _split_host(host: str) -> tuple[str, str]:
    """('name', 'port') of a Host value: 'a.b:80', '[::1]:8000', 'localhost'."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") else ""
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        return name, port
    return host, ""


def _netloc(host: str, scheme: str | None = None) -> str:
    """A host[:port] normalised for comparison: lower case, a default port dropped."""
    name, port = _split_host(host)
    if port in ({"http": "80", "https": "443"}.get(scheme, ""), "") or (scheme is None and port in ("80", "443")):
        port = ""
    name = f"[{name}]" if ":" in name else name
    return f"{name}:{port}" if port else name


def host_allowed(host: str | None, extra: list[str], scope: Scope) -> bool:
    """Keyless mode: a loopback name (any port) or one of the configured names."""
    if not host:
        return False
    name, port = _split_host(host)
    if name in LOOPBACK_NAMES:
        return True
    if name == "testserver" and (scope.get("client") or ("",))[0] == "testclient":
        return True  # Starlette's in-process TestClient, never a socket
    for e in extra:
        e = e.strip().lower()
        if e and (e == name or _netloc(e) == _netloc(host)):
            return True
    return False


def request_origin(headers: Headers) -> str | None:
    """The origin a browser says the request comes from: Origin, else Referer's, else None.
    'null' (an opaque origin: a sandboxed frame, a data: URL) is returned as is."""
    origin = headers.get("origin")
    if origin is not None:
        return origin.strip()
    referer = headers.get("referer")
    if referer:
        u = urlsplit(referer.strip())
        return f"{u.scheme}://{u.netloc}" if u.scheme and u.netloc else "null"
    return None


def same_origin(origin: str, headers: Headers) -> bool:
    """The origin names this server: its host[:port] is the request's Host (or the proxy's
    X-Forwarded-Host). The scheme is not compared: behind a TLS proxy the request itself is
    plain http."""
    u = urlsplit(origin)
    if u.scheme not in ("http", "https") or not u.netloc or "@" in u.netloc:
        return False
    mine = _netloc(u.netloc, u.scheme)
    own = [headers.get("host") or ""] + [h.split(",")[0] for h in headers.getlist("x-forwarded-host")]
    return any(h and _netloc(h) == mine for h in own)


def _refusal(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse(ErrorBody(detail=detail, code=code).model_dump(exclude_none=True), status_code=status)


class SecurityMiddleware:
    """Pure ASGI (the event stream and uploads pass through untouched): the checks above before
    the app sees a request, the headers on every response."""

    def __init__(self, app: ASGIApp, settings):
        self.app = app
        self.keyless = not settings.api_keys
        self.extra_hosts = list(settings.allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                h = MutableHeaders(scope=message)
                csp = h.get("content-security-policy")
                if csp is None:
                    h["Content-Security-Policy"] = DEFAULT_CSP
                h["X-Frame-Options"] = "SAMEORIGIN" if csp and "frame-ancestors 'self'" in csp else "DENY"
                h["X-Content-Type-Options"] = "nosniff"
                h["Referrer-Policy"] = "same-origin"
            await send(message)

        refusal = self.check(scope)
        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    def check(self, scope: Scope) -> JSONResponse | None:
        headers = Headers(scope=scope)
        if self.keyless and not host_allowed(headers.get("host"), self.extra_hosts, scope):
            return _refusal(403, "host_not_allowed", "this clcalib server has no API keys configured and answers "
                            "only requests for 127.0.0.1, localhost or [::1] (or a name in CLCALIB_ALLOWED_HOSTS); "
                            f"not Host {(headers.get('host') or '')[:100]!r}")
        if scope["method"] in SAFE_METHODS:
            return None
        if headers.get("authorization", "")[:7].lower() == "bearer ":
            return None  # a program's request: no ambient credential for another site to ride on
        origin = request_origin(headers)
        fetch_site = headers.get("sec-fetch-site")
        if (origin is not None and not same_origin(origin, headers)) or \
                (origin is None and fetch_site in ("cross-site", "same-site")):
            return _refusal(403, "cross_origin", f"a {scope['method']} from another origin "
                            f"({(origin or fetch_site or '')[:100]!r}) is refused: the web page only acts on "
                            "requests from its own pages; a program sends Authorization: Bearer <key>")
        if scope["path"] in FORM_ROUTES:
            return None
        request = Request(scope)
        expected = _expected_csrf(request)
        if expected is not None and not csrf_ok(expected, headers.get(CSRF_HEADER)):
            return _refusal(403, "csrf_failed", f"missing or wrong {CSRF_HEADER} header: the web page sends its "
                            "session's token; reload the page (a program sends Authorization: Bearer <key>)")
        return None


def is_loopback(host: str) -> bool:
    """A loopback address or the name ``localhost``: the one rule for whom keyless mode serves
    (the app's clients) and where it listens (``clcalib serve``'s bind address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_loopback_only(app) -> None:
    """Keyless mode: whatever the bind address, only loopback clients are served."""

    @app.middleware("http")
    async def _loopback_only(request: Request, call_next):
        host = request.client.host if request.client else ""
        if not (is_loopback(host) or host == "testclient"):  # Starlette's in-process TestClient, never a socket
            body = ErrorBody(detail="this clcalib server has no API keys configured "
                             "(CLCALIB_API_KEYS) and only serves loopback clients", code="loopback_only")
            return JSONResponse(body.model_dump(exclude_none=True), status_code=403)
        return await call_next(request)


def add_security(app, settings) -> None:
    """The middleware, the sessions and the sign-in limiter of an app."""
    app.state.sessions = Sessions()
    app.state.login_limiter = LoginLimiter(LOGIN_MAX_FAILURES, LOGIN_WINDOW_S)
    app.add_middleware(SecurityMiddleware, settings=settings)
