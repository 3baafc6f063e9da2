"""The dashboard's login: browsers cannot send a bearer header when they load a page, so the user
pastes a token once into a form and the LMO keeps it in a cookie.

The cookie is ``HttpOnly`` (the dashboard's scripts, or anything injected into a page, cannot read
it), ``Secure`` on TLS (never sent over plain HTTP), ``SameSite=Strict`` (another site cannot
make the browser send it) and scoped to the dashboard's path. It holds the token itself, so a
revoked token logs the browser out at its next request; the dashboard only reads, so the cookie
never authorises a change. An unauthenticated page request is redirected here
(:class:`~livemig.security.access.LoginRequired`), and back to the page after logging in.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.responses import Response as StarletteResponse

from livemig.control.web.router import _environment
from livemig.security.access import LoginRequired, TokenCheck, UserRole

COOKIE = "livemig_token"
COOKIE_MAX_AGE_S = 12 * 3600


def _safe_next(value: str, prefix: str) -> str:
    """Only back into the dashboard (no open redirect to another site)."""
    return value if value.startswith(prefix) and not value.startswith("//") and "\\" not in value else prefix


def login_router(tokens: TokenCheck, *, prefix: str = "/ui") -> APIRouter:
    """``GET/POST {prefix}/login`` and ``POST {prefix}/logout`` (public: they are how one logs in)."""
    router = APIRouter(prefix=prefix, include_in_schema=False)
    env = _environment(prefix)

    def form(next_: str, error: str | None = None, status: int = 200) -> HTMLResponse:
        html = env.get_template("login.html").render(next=_safe_next(next_, prefix), error=error, live=None)
        return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})

    @router.get("/login", response_class=HTMLResponse)
    async def login_page(next: str = prefix) -> HTMLResponse:
        return form(next)

    @router.post("/login")
    async def log_in(request: Request) -> Response:
        fields = parse_qs((await request.body()).decode(errors="replace"))
        token = (fields.get("token") or [""])[0].strip()
        next_ = (fields.get("next") or [prefix])[0]
        user = tokens(token) if token else None
        if user is None:
            return form(next_, "That token is unknown or was revoked.", 401)
        if user.role.rank < UserRole.VIEWER.rank:  # every role may view; kept for roles added later
            return form(next_, f"{user.role.value} may not view the dashboard.", 403)
        reply = RedirectResponse(_safe_next(next_, prefix), status_code=303)
        reply.set_cookie(COOKIE, token, max_age=COOKIE_MAX_AGE_S, path=prefix, httponly=True,
                         secure=request.url.scheme == "https", samesite="strict")  # fmt: skip
        return reply

    @router.post("/logout")
    async def log_out() -> Response:
        reply = RedirectResponse(f"{prefix}/login", status_code=303)
        reply.delete_cookie(COOKIE, path=prefix)
        return reply

    return router


def login_redirect(prefix: str = "/ui") -> Callable[[Request, Exception], Awaitable[StarletteResponse]]:
    """The exception handler that sends a browser without a valid login to the form."""

    async def handler(request: Request, exc: Exception) -> StarletteResponse:
        assert isinstance(exc, LoginRequired)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.headers.get("accept", "").startswith("application/json"):  # the pages' live polling
            return StarletteResponse(status_code=401, headers={"WWW-Authenticate": 'Bearer realm="livemig"'})
        return RedirectResponse(f"{prefix}/login?next={quote(target)}", status_code=303)

    return handler
