"""The dashboard's routes: server-rendered pages, their live fragments, and the charts as SVG.

Pages are HTML rendered by Jinja2 on the LMO; a small script asks the page's ``live`` URL every
second or two for fresh fragments and chart URLs (short polling: no long-lived connection that
would hold up the LMO's shutdown, and every request passes the same ``authorize`` dependency).
Charts come from ``livemig.plots``, the module the CLI draws with, rendered off the event loop
and cached by a content tag in their URL, so many viewers of one migration cost one drawing.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import datetime
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import HTMLResponse, JSONResponse
from jinja2 import Environment, PackageLoader, select_autoescape

from livemig import plots
from livemig.control.evacuation import peak_concurrency
from livemig.control.store import Store
from livemig.control.web import views
from livemig.errors import LivemigError, NotFound
from livemig.model.host import HostInfo, HostRegistration
from livemig.model.migration import FORWARD_PHASES, Migration, Phase, utcnow
from livemig.wire.lmo import Evacuation

HostInfoSource = Callable[[str], Awaitable[HostInfo]]
STATIC = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}
HOST_INFO_TIMEOUT_S = 3.0
CACHE_ENTRIES = 64


async def allow_anyone() -> None:
    """The seam for authentication: no check today. Pass ``authorize=`` (or override this
    dependency) with one that checks a bearer token's role and raises 401/403."""


def dashboard_router(
    store: Store,
    *,
    host_info: HostInfoSource,
    authorize: Callable[..., Any] = allow_anyone,
    prefix: str = "/ui",
) -> APIRouter:
    """The dashboard under ``prefix``. ``host_info`` asks a host for its ``HostInfo`` through the
    LMO's own host clients (so tests with fake hosts work too)."""
    router = APIRouter(prefix=prefix, dependencies=[Depends(authorize)], include_in_schema=False)
    env = _environment(prefix)
    charts: OrderedDict[tuple[str, ...], bytes] = OrderedDict()
    ask = host_info

    def page(template: str, status: int = 200, **context: Any) -> HTMLResponse:
        return HTMLResponse(env.get_template(template).render(**context), status_code=status)

    def fragment(template: str, **context: Any) -> str:
        return env.get_template(template).render(**context)

    async def chart(key: tuple[str, ...], draw: Callable[[], bytes], cache: bool) -> Response:
        body = charts.get(key) if cache else None
        if body is None:
            body = await asyncio.to_thread(draw)
            if cache:
                charts[key] = body
                while len(charts) > CACHE_ENTRIES:
                    charts.popitem(last=False)
        headers = {"Cache-Control": "max-age=3600" if cache else "no-store"}
        return Response(body, media_type="image/svg+xml" if key[-1] == "svg" else "image/png", headers=headers)

    # ------------------------------------------------------------------ the region

    async def region() -> views.Region:
        async def observe(reg: HostRegistration) -> tuple[HostRegistration, HostInfo | None, str | None]:
            try:
                return reg, await asyncio.wait_for(ask(reg.name), HOST_INFO_TIMEOUT_S), None
            except LivemigError as exc:
                return reg, None, exc.message
            except TimeoutError:
                return reg, None, f"did not answer within {HOST_INFO_TIMEOUT_S:.0f} s"

        hosts = list(await asyncio.gather(*(observe(reg) for reg in store.hosts())))
        return views.region(hosts, store.vms(), store.migrations())

    def region_fragments(r: views.Region) -> dict[str, str]:
        return {name: fragment(f"_{name}.html", r=r, progress=views.progress, prefix=prefix)
                for name in ("hosts", "active", "vms", "recent")}  # fmt: skip

    @router.get("", response_class=HTMLResponse)
    async def region_page() -> HTMLResponse:
        r = await region()
        return page("region.html", r=r, parts=region_fragments(r), live=f"{prefix}/live", every_ms=2000)

    @router.get("/live")
    async def region_live() -> JSONResponse:
        r = await region()
        return JSONResponse({"html": region_fragments(r), "at": utcnow().isoformat(), "final": False})

    # ------------------------------------------------------------------ one migration

    def migration_context(m: Migration) -> dict[str, Any]:
        now = utcnow()
        return {"m": m, "p": views.progress(m), "spans": plots.phase_spans(m, now), "pause": plots.pause_parts(m),
                "forward": FORWARD_PHASES, "prefix": prefix, "now": now}  # fmt: skip

    def migration_charts(m: Migration) -> dict[str, str]:
        tags = views.chart_versions(m)
        return {f"chart-{name}": f"{prefix}/migrations/{m.id}/{name}.svg?v={tag}" for name, tag in tags.items()}

    def migration_fragments(m: Migration) -> dict[str, str]:
        context = migration_context(m)
        return {name: fragment(f"_migration_{name}.html", **context) for name in ("summary", "details")}

    @router.get("/migrations/{migration_id}", response_class=HTMLResponse)
    async def migration_page(migration_id: str) -> HTMLResponse:
        try:
            m = store.migration(migration_id)
        except NotFound as exc:
            return page("error.html", 404, message=exc.message, prefix=prefix)
        live = None if m.terminal else f"{prefix}/migrations/{m.id}/live"
        return page("migration.html", m=m, parts=migration_fragments(m), charts=migration_charts(m), live=live,
                    every_ms=1000, prefix=prefix)  # fmt: skip

    @router.get("/migrations/{migration_id}/live")
    async def migration_live(migration_id: str) -> JSONResponse:
        m = store.migration(migration_id)
        return JSONResponse({"html": migration_fragments(m), "charts": migration_charts(m), "phase": m.phase.value,
                             "samples": len(m.samples), "final": m.terminal})  # fmt: skip

    @router.get("/migrations/{migration_id}/{name}.svg")
    async def migration_chart(migration_id: str, name: str, v: str = "") -> Response:
        if name not in plots.CHARTS:
            raise NotFound(f"no chart {name!r}: one of {', '.join(plots.CHARTS)}")
        m = store.migration(migration_id)
        fresh = views.chart_versions(m)[name]
        return await chart((m.id, name, fresh, "svg"), lambda: plots.migration_chart(m, name), cache=v == fresh)

    @router.get("/migrations/{migration_id}/report.png")
    async def migration_report(migration_id: str) -> Response:
        m = store.migration(migration_id)
        return await chart((m.id, "report", "png"), lambda: plots.migration_report(m, "png"), cache=False)

    # ------------------------------------------------------------------ one evacuation

    def evacuation_state(evacuation_id: str) -> tuple[Evacuation, list[Migration]]:
        evacuation = Evacuation.model_validate_json(store.evacuation(evacuation_id))
        return evacuation, [store.migration(i.migration) for i in evacuation.items if i.migration]

    def evacuation_fragments(evacuation: Evacuation, migrations: list[Migration]) -> dict[str, str]:
        by_id = {m.id: m for m in migrations}
        peaks = {"outbound": peak_concurrency(migrations, "source"),
                 "inbound": peak_concurrency(migrations, "destination")}  # fmt: skip
        return {"items": fragment("_evacuation_items.html", e=evacuation, by_id=by_id, peaks=peaks,
                                  progress=views.progress, prefix=prefix)}  # fmt: skip

    def evacuation_chart_url(evacuation: Evacuation, migrations: list[Migration]) -> str:
        tag = views.version(*(views.chart_versions(m)["timeline"] for m in migrations))
        return f"{prefix}/evacuations/{evacuation.id}/chart.svg?v={tag}"

    @router.get("/evacuations/{evacuation_id}", response_class=HTMLResponse)
    async def evacuation_page(evacuation_id: str) -> HTMLResponse:
        try:
            evacuation, migrations = evacuation_state(evacuation_id)
        except NotFound as exc:
            return page("error.html", 404, message=exc.message, prefix=prefix)
        done = all(m.terminal for m in migrations)
        return page("evacuation.html", e=evacuation, parts=evacuation_fragments(evacuation, migrations),
                    chart=evacuation_chart_url(evacuation, migrations), prefix=prefix, every_ms=1000,
                    live=None if done else f"{prefix}/evacuations/{evacuation.id}/live")  # fmt: skip

    @router.get("/evacuations/{evacuation_id}/live")
    async def evacuation_live(evacuation_id: str) -> JSONResponse:
        evacuation, migrations = evacuation_state(evacuation_id)
        return JSONResponse({"html": evacuation_fragments(evacuation, migrations),
                             "charts": {"chart-evacuation": evacuation_chart_url(evacuation, migrations)},
                             "final": all(m.terminal for m in migrations)})  # fmt: skip

    @router.get("/evacuations/{evacuation_id}/chart.svg")
    async def evacuation_chart(evacuation_id: str, v: str = "") -> Response:
        evacuation, migrations = evacuation_state(evacuation_id)
        title = f"evacuation {evacuation.id} of {evacuation.host}"
        fresh = views.version(*(views.chart_versions(m)["timeline"] for m in migrations))
        limit = evacuation.limits.region_total

        def draw() -> bytes:
            return plots.evacuation_chart(migrations, title, limit=limit)

        return await chart((evacuation.id, fresh, "svg"), draw, cache=v == fresh)

    # ------------------------------------------------------------------ files

    @router.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in STATIC:
            raise NotFound(f"no static file {name!r}")
        body = resources.files("livemig.control.web").joinpath("static", name).read_bytes()
        return Response(body, media_type=STATIC[name], headers={"Cache-Control": "max-age=300"})

    return router


def _environment(prefix: str) -> Environment:
    env = Environment(loader=PackageLoader("livemig.control.web", "templates"),
                      autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)  # fmt: skip
    env.globals.update(prefix=prefix, Phase=Phase, colours={p.value: c for p, c in plots.PHASE_COLOURS.items()})
    env.filters.update(
        clock=_clock,
        mib=lambda b: f"{b / plots.MIB:,.1f}",
        num=_num,
        since=_since,
        millis=plots.millis,
        duration=plots.duration,
    )
    return env


def _clock(at: datetime) -> str:
    return at.strftime("%H:%M:%S.%f")[:-3]


def _num(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _since(at: datetime, origin: datetime) -> str:
    return f"{(at - origin).total_seconds() * 1000:,.0f}"
