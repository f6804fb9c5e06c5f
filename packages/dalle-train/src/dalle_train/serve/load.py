"""Load a running ``dalle-train serve`` with concurrent clients and report what they saw.

::

    python -m dalle_train.serve.load http://127.0.0.1:7860 --clients 8 --seconds 30

Each client thread posts to ``/generate`` until the time is up, each request with its own prompt
and seed (``client 3 request 17``), and checks its answer: the prompt, seed and number of
images it asked for, and each PNG carrying the same prompt, seed and its index (an answer
holding another client's images is counted as mixed). A "busy" answer (503) is retried after a
short pause, so no request is given up; anything else is an error. The report: completed
requests and images per second, latency percentiles of completed requests (including the
retries), busy answers, errors, lost and mixed requests.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dalle_train.serve.pngs import png_settings

BUSY_PAUSE_SECONDS = 0.05


@dataclass
class Completed:
    """One answered request: what was asked, how long it took, the answer."""

    body: dict[str, Any]
    seconds: float
    answer: dict[str, Any]


@dataclass
class LoadReport:
    """What the clients saw; `problems` lists lost, mixed and failed requests."""

    clients: int
    seconds: float
    completed: list[Completed] = field(default_factory=list)
    busy: int = 0
    errors: list[str] = field(default_factory=list)
    mixed: list[str] = field(default_factory=list)
    sent: int = 0

    @property
    def lost(self) -> int:
        """Requests sent that got neither an answer nor an error."""
        return self.sent - len(self.completed) - len(self.errors)

    def percentile(self, share: float) -> float:
        """Latency (s) below which ``share`` of the completed requests finished (nearest rank)."""
        ordered = sorted(done.seconds for done in self.completed)
        if not ordered:
            return math.nan
        return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]

    def summary(self) -> dict[str, Any]:
        images = sum(len(done.answer["images"]) for done in self.completed)
        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 2),
            "requests": len(self.completed),
            "requests_per_second": round(len(self.completed) / self.seconds, 2),
            "images_per_second": round(images / self.seconds, 2),
            "latency_p50_s": round(self.percentile(0.5), 3),
            "latency_p90_s": round(self.percentile(0.9), 3),
            "latency_p99_s": round(self.percentile(0.99), 3),
            "latency_max_s": round(self.percentile(1.0), 3),
            "busy_answers": self.busy,
            "errors": len(self.errors),
            "lost": self.lost,
            "mixed": len(self.mixed),
        }

    def problems(self) -> list[str]:
        lost = [f"{self.lost} requests lost"] if self.lost else []
        return [*lost, *self.mixed, *self.errors]


def default_body(client: int, number: int) -> dict[str, Any]:
    """Request ``number`` of ``client``: its own prompt and seed, 1 or 2 images, every code drawn."""
    return {"prompt": f"client {client} request {number}", "seed": client * 100_000 + number,
            "num_images": 1 + (client + number) % 2, "top_k": 0}


def check_answer(body: dict[str, Any], answer: dict[str, Any]) -> str | None:
    """Why ``answer`` is not the answer to ``body`` (None when it is)."""
    if (answer.get("prompt"), answer.get("seed")) != (body["prompt"], body["seed"]):
        return f"{body['prompt']!r} got the answer of {answer.get('prompt')!r} seed {answer.get('seed')}"
    indices = sorted(image["index"] for image in answer.get("images", []))
    if indices != list(range(body.get("num_images", 1))):
        return f"{body['prompt']!r} asked for {body.get('num_images', 1)} images and got indices {indices}"
    for image in answer["images"]:
        carried = png_settings(base64.b64decode(image["png_base64"]))
        expected = (body["prompt"], body["seed"], image["index"])
        if (carried["prompt"], carried["seed"], carried["index"]) != expected:
            return (f"{body['prompt']!r} image {image['index']} carries {carried['prompt']!r} "
                    f"seed {carried['seed']} image {carried['index']}")
    return None


def run_load(
    url: str,
    clients: int,
    seconds: float,
    body_for: Callable[[int, int], dict[str, Any]] = default_body,
    timeout: float = 120,
) -> LoadReport:
    """``clients`` threads post to ``url/generate`` until ``seconds`` have passed (a request
    started before then is waited for) -> what they saw."""
    report = LoadReport(clients, seconds)
    lock = threading.Lock()
    started = time.perf_counter()
    deadline = started + seconds

    def client(index: int) -> None:
        number = 0
        while time.perf_counter() < deadline:
            body = body_for(index, number)
            number += 1
            with lock:
                report.sent += 1
            began = time.perf_counter()
            while True:
                status, answer = _post(f"{url}/generate", body, timeout)
                if status != 503:
                    break
                with lock:
                    report.busy += 1
                time.sleep(BUSY_PAUSE_SECONDS)
            elapsed = time.perf_counter() - began
            with lock:
                if status != 200:
                    report.errors.append(f"{body['prompt']!r}: HTTP {status} {answer}")
                    continue
                report.completed.append(Completed(body, elapsed, answer))
                problem = check_answer(body, answer)
                if problem is not None:
                    report.mixed.append(problem)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + timeout)
    report.seconds = time.perf_counter() - started
    return report


def _post(url: str, body: dict[str, Any], timeout: float) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, error.read()[:200]
    except OSError as error:  # refused, reset, timed out
        return 0, f"{type(error).__name__}: {error}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:7860")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--seconds", type=float, default=30, help="how long to send requests (default 30)")
    args = parser.parse_args(argv)
    report = run_load(args.url.rstrip("/"), args.clients, args.seconds)
    print(json.dumps(report.summary(), indent=2))
    for problem in report.problems()[:20]:
        print(f"problem: {problem}")
    return 1 if report.problems() else 0


if __name__ == "__main__":
    raise SystemExit(main())
