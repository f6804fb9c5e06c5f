"""The queue of generation jobs and the worker thread that owns the model.

Requests become `Job`s in a bounded queue (`Busy` when it is full: the server answers "busy,
retry" instead of piling work up). One worker thread takes the oldest job and fills a batch of up
to ``max_batch`` images with the images still to make of it and of the queued jobs after it that
share its sampling settings; each image is drawn from its own generator (`image_seed`), so a
request gets the same images alone or batched with others. A job asking for more images than a
batch holds runs over several batches, and its images appear as each batch finishes.

A job can be cancelled at any time: queued, it is dropped; running, its images are discarded, and
a batch whose jobs are all cancelled stops at the next code. A batch that fails marks its jobs
failed with the error, and the worker goes on with the next.
"""

from __future__ import annotations

import itertools
import logging
import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dalle_core import CLIP, DALLE
from dalle_train.serve.requests import GenerationRequest, image_seed

LOG = logging.getLogger("dalle_train.serve")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = frozenset({DONE, FAILED, CANCELLED})


class Busy(Exception):
    """The queue is full: the client should retry later."""


class Cancelled(Exception):
    """Raised inside generation when every job of the batch has been cancelled."""


@dataclass
class FinishedImage:
    """One image of a job: its index in the request, pixels ``[C, H, W]`` in [0, 1] (CPU, fp32)
    and its CLIP score (None without a CLIP)."""

    index: int
    pixels: torch.Tensor
    score: float | None


@dataclass(eq=False)  # jobs are told apart by identity (their request holds a tensor)
class Job:
    """One request on its way through the queue; fields change under the queue's lock."""

    request: GenerationRequest
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: str = QUEUED
    next_image: int = 0  # images handed to batches so far
    images: list[FinishedImage] = field(default_factory=list)
    progress: float = 0.0  # share of the request's codes sampled, 0 .. 1
    error: str | None = None

    @property
    def remaining(self) -> int:
        """Images not yet handed to a batch."""
        return self.request.num_images - self.next_image

    def ranked(self) -> list[FinishedImage]:
        """The finished images, best CLIP score first (request order without scores)."""
        if any(image.score is None for image in self.images):
            return sorted(self.images, key=lambda image: image.index)
        return sorted(self.images, key=lambda image: (-image.score, image.index))


@dataclass(frozen=True)
class BatchRow:
    """One image of a batch: the job it belongs to and its index in that job's request."""

    job: Job
    index: int


class JobQueue:
    """Jobs waiting or running, and the finished ones kept for ``keep_finished`` lookups."""

    def __init__(self, max_waiting: int, keep_finished: int = 256):
        self.max_waiting = max_waiting
        self.keep_finished = keep_finished
        self.lock = threading.Condition()
        self.waiting: list[Job] = []  # oldest first; a job stays here until all its images are handed out
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.closed = False

    def submit(self, request: GenerationRequest) -> Job:
        """Queue ``request``; `Busy` when ``max_waiting`` jobs are already waiting."""
        with self.lock:
            if len(self.waiting) >= self.max_waiting:
                raise Busy(f"busy: {len(self.waiting)} requests are waiting; retry in a few seconds")
            job = Job(request)
            self.waiting.append(job)
            self.jobs[job.id] = job
            self._forget_old()
            self.lock.notify_all()
            return job

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def position(self, job: Job) -> int:
        """Jobs ahead of ``job`` in the queue (0: it is the next, or running)."""
        with self.lock:
            return self.waiting.index(job) if job in self.waiting and job.state == QUEUED else 0

    def cancel(self, job: Job) -> None:
        """Drop a queued job; a running one finishes as cancelled and its images are discarded."""
        with self.lock:
            if job.state in FINISHED:
                return
            if job in self.waiting:
                self.waiting.remove(job)
            job.state, job.images = CANCELLED, []

    def next_batch(self, max_batch: int, timeout: float | None = None) -> list[BatchRow]:
        """Up to ``max_batch`` images to make: the oldest job's, then those of later jobs with the
        same sampling settings; empty after ``timeout`` seconds with nothing queued or when closed."""
        with self.lock:
            if not self.lock.wait_for(lambda: self.waiting or self.closed, timeout):
                return []
            if self.closed:
                return []
            settings = self.waiting[0].request.sampling
            rows: list[BatchRow] = []
            for job in list(self.waiting):
                if job.request.sampling != settings:
                    continue
                take = min(job.remaining, max_batch - len(rows))
                rows += [BatchRow(job, job.next_image + i) for i in range(take)]
                job.next_image += take
                job.state = RUNNING
                if job.remaining == 0:
                    self.waiting.remove(job)
                if len(rows) == max_batch:
                    break
            return rows

    def all_cancelled(self, rows: list[BatchRow]) -> bool:
        with self.lock:
            return all(row.job.state == CANCELLED for row in rows)

    def finish_rows(self, rows: list[BatchRow], images: torch.Tensor, scores: torch.Tensor | None) -> None:
        """Hand each finished image ``images [R, C, H, W]`` to its job; a job with all its images
        is done."""
        with self.lock:
            for i, row in enumerate(rows):
                job = row.job
                if job.state == CANCELLED:
                    continue
                score = None if scores is None else float(scores[i])
                job.images.append(FinishedImage(row.index, images[i], score))
                job.progress = len(job.images) / job.request.num_images
                if len(job.images) == job.request.num_images:
                    job.state = DONE

    def fail_rows(self, rows: list[BatchRow], message: str) -> None:
        """Every job with an image in ``rows`` fails with ``message`` (its other images too)."""
        with self.lock:
            for job in dict.fromkeys(row.job for row in rows):
                if job.state in FINISHED:
                    continue
                if job in self.waiting:
                    self.waiting.remove(job)
                job.state, job.error, job.images = FAILED, message, []

    def report_progress(self, rows: list[BatchRow], share: float) -> None:
        """The batch has sampled ``share`` (0 .. 1) of its codes: each job's progress counts its
        finished images plus that share of its images in the batch."""
        with self.lock:
            for job, in_batch in Counter(row.job for row in rows).items():
                if job.state == RUNNING:
                    job.progress = (len(job.images) + share * in_batch) / job.request.num_images

    def close(self) -> None:
        """Stop handing out batches; waiting jobs are cancelled."""
        with self.lock:
            self.closed = True
            for job in self.waiting:
                job.state = CANCELLED
            self.waiting.clear()
            self.lock.notify_all()

    def _forget_old(self) -> None:
        finished = [job_id for job_id, job in self.jobs.items() if job.state in FINISHED]
        for job_id in itertools.islice(finished, max(0, len(finished) - self.keep_finished)):
            del self.jobs[job_id]


class Worker(threading.Thread):
    """The thread that owns the model: takes batches from ``queue`` and generates them."""

    def __init__(
        self,
        queue: JobQueue,
        dalle: DALLE,
        clip: CLIP | None = None,
        max_batch: int = 4,
        on_batch: Callable[[list[BatchRow]], None] | None = None,
    ):
        super().__init__(name="dalle-serve-worker", daemon=True)
        self.queue, self.dalle, self.clip, self.max_batch = queue, dalle, clip, max_batch
        self.on_batch = on_batch  # called with each batch before it runs (tests, logs)
        self.batches = 0

    def run(self) -> None:
        while not self.queue.closed:
            rows = self.queue.next_batch(self.max_batch, timeout=0.5)
            if not rows:
                continue
            self.batches += 1
            if self.on_batch is not None:
                self.on_batch(rows)
            try:
                images, scores = self.generate(rows)
            except Cancelled:
                continue
            except Exception as error:  # a failed batch fails its jobs; the server goes on
                LOG.exception("generation failed for %d images", len(rows))
                self.queue.fail_rows(rows, f"generation failed: {type(error).__name__}: {error}")
                continue
            self.queue.finish_rows(rows, images, scores)

    def generate(self, rows: list[BatchRow]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images ``[R, C, H, W]`` (CPU, fp32) for the batch, and their CLIP scores ``[R]``."""
        device = self.dalle.text_emb.weight.device
        text = torch.cat([row.job.request.text for row in rows]).to(device)  # [R, L]
        generators = [
            torch.Generator(device).manual_seed(image_seed(row.job.request.seed, row.index)) for row in rows
        ]
        settings = rows[0].job.request.sampling

        def progress(done: int, total: int) -> None:
            if self.queue.all_cancelled(rows):
                raise Cancelled
            self.queue.report_progress(rows, done / total)

        output = self.dalle.generate_images(
            text, clip=self.clip, filter_thres=settings.top_k, top_p=settings.top_p,
            temperature=settings.temperature, cond_scale=settings.cond_scale, generator=generators,
            progress=progress,
        )
        images, scores = output if self.clip is not None else (output, None)
        return images.float().cpu(), (scores.float().cpu() if scores is not None else None)
