"""The web dashboard (``corral dashboard``, or ``[dashboard] listen``): an
aiohttp app that asks the broker through an :class:`~corral.client.AsyncClient`
and renders pages with Jinja2 (autoescaped), with no JavaScript build step.

Pages: the overview (queues with depth, latency and pause/resume; workers
and pools; schedules with their next run), the job list with filters (and,
for failed jobs, retry and delete one at a time or in bulk), and one job
(its tries, error, traceback and progress). ``static/live.js`` refreshes the
parts marked ``data-live`` every two seconds from ``?fragment=1`` versions
of the same pages: live updates without a framework.

Every request, page or action, is answered only under an allowed Host
name (:mod:`corral.dashboard.hosts`, ``[dashboard] allowed_hosts``): any
other gets 400 and why, so a page of another site whose name was made to
resolve here (DNS rebinding) can read nothing.

Read-only unless ``allow_actions``: every action is a POST, refused (403)
when actions are off or when its Origin is not the dashboard's own (a page
elsewhere cannot make a visitor's browser act), and, on a loopback address,
when its Host names something other than ``localhost`` or an address (DNS
rebinding: a page whose name was made to resolve to 127.0.0.1 has the
dashboard's origin). It listens on loopback unless told otherwise.
"""

from __future__ import annotations

import contextlib
import ipaddress
import time
from collections.abc import Awaitable, Callable
from typing import Any

import jinja2
from aiohttp import web

from corral.asyncclient import AsyncClient
from corral.broker.protocol import STATUSES
from corral.cliformat import age_text, when_text
from corral.dashboard.hosts import AllowedHosts
from corral.errors import BrokerError, BrokerUnavailable, CorralError, JobNotFound

#: Jobs a bulk action goes through at most (pages of :data:`PAGE`).
BULK_LIMIT = 10_000
#: Jobs per page of the job list.
PAGE = 50

CLIENT = web.AppKey("client", AsyncClient)
ALLOW = web.AppKey("allow_actions", bool)
TEMPLATES = web.AppKey("templates", jinja2.Environment)
HOSTS = web.AppKey("allowed_hosts", AllowedHosts)


def make_app(
    client: AsyncClient, *, allow_actions: bool, hosts: AllowedHosts | None = None
) -> web.Application:
    """The dashboard over ``client`` (an AsyncClient of the broker),
    answering under the Host names ``hosts`` allows (default: those of a
    dashboard listening on loopback)."""
    app = web.Application(middlewares=[_allowed_host, _errors])
    app[CLIENT] = client
    app[ALLOW] = allow_actions
    app[HOSTS] = hosts if hosts is not None else AllowedHosts.default("127.0.0.1")
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("corral.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["when"] = _when
    env.filters["age"] = age_text
    app[TEMPLATES] = env
    app.router.add_get("/", overview)
    app.router.add_get("/jobs", jobs)
    app.router.add_get("/jobs/{job_id}", job)
    app.router.add_post("/actions/{action}", act)
    app.router.add_static("/static", _static_dir())
    return app


def _static_dir() -> str:
    from importlib import resources

    return str(resources.files("corral.dashboard").joinpath("static"))


def _when(ts: float | None) -> str:
    return when_text(ts, millis=False)


def _render(request: web.Request, name: str, **values: Any) -> web.Response:
    fragment = request.query.get("fragment") == "1"
    template = request.app[TEMPLATES].get_template(name)
    html = template.render(
        fragment=fragment,
        allow_actions=request.app[ALLOW],
        statuses=STATUSES,
        now=time.time(),
        notice=request.query.get("notice", ""),
        **values,
    )
    return web.Response(text=html, content_type="text/html")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _allowed_host(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse (400) a request whose Host is not an allowed name, before
    anything is read or served."""
    host = request.headers.get("Host")
    hosts = request.app[HOSTS]
    if hosts.allows(host):
        return await handler(request)
    return web.Response(
        status=400,
        text=f"the host name {host!r} is not one this dashboard answers to (allowed: {hosts}, "
        "and any address): a page of another site whose name was made to resolve here (DNS "
        "rebinding) must read nothing. If you reach the dashboard by this name, add it to "
        "[dashboard] allowed_hosts in the config.\n",
    )


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A broker that does not answer is a 503 page, a bad request a 400:
    never a traceback."""
    try:
        return await handler(request)
    except BrokerUnavailable as exc:
        return web.Response(status=503, text=f"the broker does not answer: {exc}")
    except JobNotFound as exc:
        return web.Response(status=404, text=str(exc))
    except (BrokerError, CorralError, ValueError) as exc:
        return web.Response(status=400, text=str(exc))


async def overview(request: web.Request) -> web.Response:
    status = await request.app[CLIENT].status()
    return _render(request, "overview.html", status=status)


async def jobs(request: web.Request) -> web.Response:
    q = request.query
    queue, status, task = q.get("queue") or None, q.get("status") or None, q.get("task") or None
    if status is not None and status not in STATUSES:
        raise ValueError(f"status: {status!r} is not one of {', '.join(STATUSES)}")
    newest = q.get("newest", "1") == "1"
    page = await request.app[CLIENT].jobs(
        queue, status, PAGE, task=task, cursor=q.get("cursor") or None, newest=newest
    )
    filters = {"queue": queue or "", "status": status or "", "task": task or ""}
    return _render(request, "jobs.html", page=page, filters=filters, newest=newest)


async def job(request: web.Request) -> web.Response:
    info = await request.app[CLIENT].job(request.match_info["job_id"])
    return _render(request, "job.html", job=info)


async def act(request: web.Request) -> web.Response:
    """One action (POST): pause, resume, retry, delete, retry-failed,
    delete-failed; then back to where it was asked (303)."""
    if not request.app[ALLOW]:
        raise web.HTTPForbidden(text="actions are off: set allow_actions = true in [dashboard]")
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise web.HTTPForbidden(text=f"an action from {origin} is refused")
    if _rebound(request) and not request.app[HOSTS].names(request.host):
        raise web.HTTPForbidden(
            text=f"an action through the host name {request.host!r} is refused: this dashboard"
            " listens on loopback, where only localhost or an address reaches it (a page whose"
            " name was made to resolve here, DNS rebinding, would have the same origin)"
        )
    form = await request.post()
    client = request.app[CLIENT]
    action = request.match_info["action"]
    target = str(form.get("queue") or form.get("id") or "")
    if action in ("pause", "resume"):
        await (client.pause if action == "pause" else client.resume)(target)
        notice = f"{target}: {action}d"
    elif action in ("retry", "delete"):
        await (client.retry if action == "retry" else client.delete)(target)
        notice = f"{target}: {'retried' if action == 'retry' else 'deleted'}"
    elif action in ("retry-failed", "delete-failed"):
        count = await _bulk(client, action, target or None)
        notice = f"{count} failed job(s) {'retried' if action == 'retry-failed' else 'deleted'}"
    else:
        raise web.HTTPNotFound(text=f"no action {action!r}")
    back = str(form.get("back") or "/")
    if not back.startswith("/") or back.startswith("//"):
        back = "/"
    sep = "&" if "?" in back else "?"
    raise web.HTTPSeeOther(f"{back}{sep}notice={_quote(notice)}")


def _rebound(request: web.Request) -> bool:
    """The request came to a loopback address under a host name other than
    ``localhost``: a browser names a dashboard on loopback by an address or
    ``localhost`` (an ssh tunnel included), and a page of another site whose
    name its DNS now resolves here (DNS rebinding) passes the Origin check."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not sockname or not _loopback(str(sockname[0])):
        return False
    name = (request.url.host or "").strip("[]").rstrip(".").lower()
    return name != "localhost" and not name.endswith(".localhost") and not _is_address(name)


def _loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool((mapped or ip).is_loopback)


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


async def _bulk(client: AsyncClient, action: str, queue: str | None) -> int:
    """Retry (the broker's retry_failed) or delete every failed job of
    ``queue`` (None: all), up to :data:`BULK_LIMIT`."""
    if action == "retry-failed":
        return len(await client.retry_failed(queue))
    ids: list[str] = []
    cursor = None
    while len(ids) < BULK_LIMIT:
        page = await client.jobs(queue, "failed", 500, cursor=cursor)
        ids += [info.id for info in page]
        cursor = page.cursor
        if cursor is None:
            break
    for job_id in ids[:BULK_LIMIT]:
        with contextlib.suppress(JobNotFound):  # gone meanwhile (its TTL, or another hand)
            await client.delete(job_id)
    return min(len(ids), BULK_LIMIT)


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")
