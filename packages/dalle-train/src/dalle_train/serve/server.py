"""uvicorn serving the application with its worker: in the foreground (the command) or in a
background thread (tests, benchmarks)."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from types import TracebackType

import uvicorn

from dalle_core import CLIP, DALLE
from dalle_train.serve.app import Service, create_app
from dalle_train.serve.batcher import JobQueue, Worker

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (``127.x``, ``::1``, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Server:
    """The worker thread and uvicorn over one loaded model.

    ``with Server(...) as server:`` serves in a background thread at ``server.url`` until the
    block ends; `serve_forever` serves in the calling thread until interrupted.
    """

    def __init__(
        self,
        dalle: DALLE,
        clip: CLIP | None = None,
        *,
        host: str = LOOPBACK,
        port: int = 7860,
        max_images: int = 16,
        max_batch: int = 4,
        max_waiting: int = 32,
        model_name: str = "dalle",
    ):
        self.queue = JobQueue(max_waiting)
        self.service = Service(dalle.eval(), clip.eval() if clip is not None else None, self.queue,
                               max_images, max_batch, model_name)
        self.worker = Worker(self.queue, self.service.dalle, self.service.clip, max_batch)
        self.app = create_app(self.service)
        self.host, self.port = host, port or free_port(host)
        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning",
                                timeout_graceful_shutdown=5)
        self.uvicorn = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        """Serve until Ctrl-C (uvicorn's signal handling), then stop the worker."""
        self.worker.start()
        try:
            self.uvicorn.run()
        finally:
            self.queue.close()

    def __enter__(self) -> Server:
        self.worker.start()
        self.thread = threading.Thread(target=self.uvicorn.run, name="dalle-serve-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.uvicorn.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.queue.close()
        self.worker.join(timeout=30)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
