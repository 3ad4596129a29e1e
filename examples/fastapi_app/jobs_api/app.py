"""A FastAPI app that enqueues corral jobs and shows them.

``POST /jobs`` takes ``{"numbers": [1, 2, 3]}``, enqueues ``api.total`` and
answers 202 with ``{"id": "<job id>", "pid": ...}``. ``GET /jobs/{id}``
answers ``{"id", "status", "attempts", "result", "error", "pid"}``: the
result once the job succeeded, the last error once one was raised; 404 for
a job the broker does not know (or no longer: ``result_ttl``). 503 when the
broker does not answer. ``pid`` is the web worker's process id, to see
which worker answered.

Run it with ``uvicorn jobs_api.app:app --workers 2`` from this directory.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

import corral
from jobs_api.client import close_client, corral_client
from jobs_api.tasks import total

Client = Annotated[corral.AsyncClient, Depends(corral_client)]


class TotalRequest(BaseModel):
    numbers: list[int]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    close_client()


app = FastAPI(title="corral jobs", lifespan=lifespan)


@app.post("/jobs", status_code=202)
async def create_job(body: TotalRequest, client: Client) -> dict[str, Any]:
    job_id = await client.enqueue(total, body.numbers)  # durable once it returns
    return {"id": job_id, "pid": os.getpid()}


@app.get("/jobs/{job_id}")
async def show_job(job_id: str, client: Client) -> dict[str, Any]:
    info = await client.job(job_id)
    result = None
    if info.status == "succeeded":
        result = await client.result(job_id, timeout=0)  # finished: no wait
    error = f"{info.error.type}: {info.error.message}" if info.error is not None else None
    return {
        "id": info.id,
        "status": info.status,
        "attempts": info.attempts,
        "result": result,
        "error": error,
        "pid": os.getpid(),
    }


@app.exception_handler(corral.JobNotFound)
async def job_not_found(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=404)


@app.exception_handler(corral.BrokerUnavailable)
async def broker_unavailable(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=503)
