"""The web application: the page, the job API the page uses, and ``POST /generate`` for scripts.

Routes:

- ``GET /``: the page (a prompt box, the settings, images as they finish, best first with a CLIP).
- ``GET /api/info``: the model's sizes, the server's limits and the default settings.
- ``POST /api/jobs`` (JSON request, fields of `dalle_train.serve.requests`) -> 202 ``{"id": ...}``;
  ``GET /api/jobs/{id}`` -> state, queue position, progress, finished images (URLs, scores);
  ``DELETE /api/jobs/{id}`` cancels; ``GET /api/jobs/{id}/images/{index}.png`` is one image as a
  PNG carrying its settings.
- ``POST /generate`` (the same JSON) waits and answers every image as base64 PNG with its score,
  best first; a client that disconnects cancels its job.

A bad request is 400 ``{"error": message, "field": name}``; a full queue is 503 ``{"error":
"busy: ..."}`` with ``Retry-After``; an unknown job is 404.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from dalle_core import CLIP, DALLE
from dalle_train.serve.batcher import DONE, FINISHED, Busy, FinishedImage, Job, JobQueue
from dalle_train.serve.pngs import download_name, png_bytes
from dalle_train.serve.requests import DEFAULTS, RequestError, parse_request

POLL_SECONDS = 0.05  # how often a waiting POST /generate looks at its job and its client
RETRY_AFTER_SECONDS = 2


@dataclass
class Service:
    """What the application serves: the model, the queue its worker takes from, the limits."""

    dalle: DALLE
    clip: CLIP | None
    queue: JobQueue
    max_images: int
    max_batch: int
    model_name: str


def create_app(service: Service) -> FastAPI:
    """The FastAPI application over ``service`` (whose worker must be running)."""
    app = FastAPI(title="dalle-train serve", docs_url=None, redoc_url=None)
    page = resources.files("dalle_train.serve").joinpath("page.html").read_text()

    def submit(body: Any) -> Job | JSONResponse:
        try:
            request = parse_request(body, service.dalle, service.max_images)
            return service.queue.submit(request)
        except RequestError as error:
            return JSONResponse({"error": str(error), "field": error.field}, status_code=400)
        except Busy as error:
            return JSONResponse({"error": str(error)}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    async def json_body(request: Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            return None  # parse_request names the body

    def find(job_id: str) -> Job | JSONResponse:
        job = service.queue.get(job_id)
        if job is None:
            message = f"no job {job_id!r} (unknown, or finished long ago)"
            return JSONResponse({"error": message}, status_code=404)
        return job

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        dalle = service.dalle
        return {
            "model": service.model_name,
            "text_seq_len": dalle.text_seq_len,
            "image_size": dalle.image_size,
            "max_images": service.max_images,
            "max_batch": service.max_batch,
            "clip": service.clip is not None,
            "defaults": DEFAULTS,
        }

    @app.post("/api/jobs", status_code=202)
    async def create_job(request: Request) -> Any:
        job = submit(await json_body(request))
        return job if isinstance(job, JSONResponse) else {"id": job.id}

    @app.get("/api/jobs/{job_id}")
    async def job_status(job_id: str) -> Any:
        job = find(job_id)
        if isinstance(job, JSONResponse):
            return job
        return {
            "id": job.id,
            "state": job.state,
            "position": service.queue.position(job),
            "progress": round(job.progress, 4),
            "error": job.error,
            "settings": job.request.describe(),
            "images": [
                {"index": image.index, "score": image.score,
                 "url": f"/api/jobs/{job.id}/images/{image.index}.png"}
                for image in job.ranked()
            ],
        }

    @app.delete("/api/jobs/{job_id}")
    async def cancel_job(job_id: str) -> Any:
        job = find(job_id)
        if isinstance(job, JSONResponse):
            return job
        service.queue.cancel(job)
        return {"id": job.id, "state": job.state}

    @app.get("/api/jobs/{job_id}/images/{index}.png")
    async def job_image(job_id: str, index: int) -> Response:
        job = find(job_id)
        if isinstance(job, JSONResponse):
            return job
        image = next((image for image in list(job.images) if image.index == index), None)
        if image is None:
            return JSONResponse({"error": f"job {job_id} has no finished image {index}"}, status_code=404)
        settings = image_settings(job, image)
        return Response(png_bytes(image, settings), media_type="image/png",
                        headers={"Content-Disposition": f'inline; filename="{download_name(settings)}"'})

    @app.post("/generate")
    async def generate(request: Request) -> Any:
        job = submit(await json_body(request))
        if isinstance(job, JSONResponse):
            return job
        while job.state not in FINISHED:
            if await request.is_disconnected():
                service.queue.cancel(job)
                return Response(status_code=499)
            await asyncio.sleep(POLL_SECONDS)
        if job.state != DONE:
            message = job.error or f"the job was {job.state}"
            return JSONResponse({"error": message, "id": job.id}, status_code=500)
        return {
            "id": job.id,
            **job.request.describe(),
            "images": [
                {
                    "index": image.index,
                    "score": image.score,
                    "png_base64": base64.b64encode(png_bytes(image, image_settings(job, image))).decode(),
                }
                for image in job.ranked()
            ],
        }

    return app


def image_settings(job: Job, image: FinishedImage) -> dict[str, Any]:
    """What a served PNG carries: its request's settings, its index and its CLIP score."""
    return {**job.request.describe(), "index": image.index, "score": image.score}
