"""The LMO's pooled client (aiohttp called directly) against a real uvicorn server: it must read
replies, errors, query values, JSON bodies, headers and timeouts exactly as the httpx client does,
since every ``Call`` and the error decoder are shared by both."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from pydantic import BaseModel

from livemig import errors
from livemig.faults.registry import CURRENT, MIGRATION_HEADER, Scope
from livemig.testing.tlsserver import ThreadedUvicorn
from livemig.wire.base import AsyncHttp, AsyncService, Credentials, async_http, call
from livemig.wire.pooled import PooledHttp
from livemig.wire.server import install_error_handlers


class Echo(BaseModel):
    method: str
    query: dict[str, str]
    body: Any = None
    migration: str | None = None
    token: str | None = None


def make_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.api_route("/echo", methods=["GET", "POST", "PUT"])
    async def echo(request: Request) -> Echo:
        body = (await request.json()) if await request.body() else None
        headers = request.headers
        return Echo(method=request.method, query=dict(request.query_params), body=body,
                    migration=headers.get(MIGRATION_HEADER), token=headers.get("authorization"))  # fmt: skip

    @app.get("/conflict")
    async def conflict() -> None:
        raise errors.Conflict("VM vm busy", vm="vm")

    @app.get("/slow")
    async def slow() -> None:
        await asyncio.sleep(2)

    @app.get("/busy")
    async def busy() -> dict[str, str]:
        await asyncio.sleep(0.5)
        return {"done": "yes"}

    return app


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedUvicorn]:
    with ThreadedUvicorn(make_app()) as served:
        yield served


def both(timeout: float = 5) -> list[AsyncHttp]:
    creds = Credentials(token="t0ken")
    return [async_http(timeout, credentials=creds, pooled=True), async_http(timeout, credentials=creds)]


def test_pooled_is_aiohttp_and_reads_like_httpx(server: ThreadedUvicorn) -> None:
    async def scenario() -> list[Echo]:
        seen: list[Echo] = []
        for http in both():
            async with http:
                service = AsyncService("host A", f"http://127.0.0.1:{server.port}", http)
                token = CURRENT.set(Scope(migration="m-1", vm="vm1"))
                try:
                    seen.append(await service.run(call("POST", "/echo", Echo, json={"a": [1, 2]},
                                                       params={"since": 3, "all": True, "off": False})))  # fmt: skip
                finally:
                    CURRENT.reset(token)
                seen.append(await service.run(call("GET", "/echo", Echo)))
        return seen

    first, plain, first_httpx, plain_httpx = asyncio.run(scenario())
    assert isinstance(both()[0], PooledHttp)
    assert first == first_httpx  # the same request on the wire, whichever client sent it
    assert first.method == "POST" and first.body == {"a": [1, 2]}
    assert first.query == {"since": "3", "all": "true", "off": "false"}
    assert first.migration == "m-1;vm=vm1" and first.token == "Bearer t0ken"
    assert plain == plain_httpx and plain.body is None and plain.migration is None


def test_an_error_reply_and_a_dead_or_slow_service_raise_as_with_httpx(server: ThreadedUvicorn) -> None:
    async def scenario() -> None:
        async with async_http(5, pooled=True) as http:
            service = AsyncService("host A", f"http://127.0.0.1:{server.port}", http)
            with pytest.raises(errors.Conflict) as caught:
                await service.run(call("GET", "/conflict"))
            assert caught.value.message == "host A: VM vm busy" and caught.value.details == {"vm": "vm"}
            with pytest.raises(errors.NotFound):
                await service.run(call("GET", "/nowhere"))
            with pytest.raises(errors.HostUnreachable, match="did not answer GET /slow"):
                await service.run(call("GET", "/slow", timeout=0.3))
            dead = AsyncService("blockd", "http://127.0.0.1:9", http)
            with pytest.raises(errors.HostUnreachable, match=r"blockd at http://127\.0\.0\.1:9 did not answer GET /x"):
                await dead.run(call("GET", "/x"))

    asyncio.run(scenario())


def test_a_test_transport_keeps_httpx() -> None:
    transport = httpx.ASGITransport(app=make_app())
    assert isinstance(async_http(transport=transport, pooled=True), httpx.AsyncClient)


def test_waiting_for_a_pooled_connection_is_not_a_connect_timeout(server: ThreadedUvicorn) -> None:
    """A busy LMO waits for a free connection of its pool; only opening one is bounded by the
    connect timeout (as with httpx), so the wait is not taken for an unreachable host."""

    async def scenario() -> list[dict[str, str]]:
        async with async_http(httpx.Timeout(5.0, connect=0.2), pooled=True, connections=1) as http:
            service = AsyncService("host A", f"http://127.0.0.1:{server.port}", http)
            return await asyncio.gather(*(service.run(call("GET", "/busy", dict[str, str])) for _ in range(2)))

    assert asyncio.run(scenario()) == [{"done": "yes"}] * 2
