"""``dalle-train serve`` over HTTP on 127.0.0.1, from a tiny DALLE trained in the test: the JSON
endpoint and the job API give the images `DALLE.generate_images` gives for the same seed;
concurrent requests are batched without mixing; bad requests get messages naming the field;
a full queue answers busy; cancelled, disconnected and failing requests leave the server
serving."""

from __future__ import annotations

import base64
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason='the serve extra is not installed: pip install "dalle-train[serve]"')
pytest.importorskip("uvicorn", reason='the serve extra is not installed: pip install "dalle-train[serve]"')

from serve_helpers import Gate, get, images_alone, load_dalle, png_pixels, post, train_tiny_dalle  # noqa: E402

from dalle_core import CLIP  # noqa: E402
from dalle_train import cli  # noqa: E402
from dalle_train.serve import server as server_module  # noqa: E402
from dalle_train.serve.batcher import CANCELLED, DONE, FAILED  # noqa: E402
from dalle_train.serve.pngs import png_settings  # noqa: E402
from dalle_train.serve.server import Server  # noqa: E402

ATOL = 1.5 / 255  # one 8-bit level: the PNG rounds each pixel


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, vae_dir: Path) -> Path:
    return train_tiny_dalle(tmp_path_factory.mktemp("serve") / "run", vae_dir)


@pytest.fixture(scope="module")
def dalle(run_dir: Path):
    torch.set_num_threads(1)
    return load_dalle(run_dir)


def serving(dalle, gate: Gate | None = None, **options) -> Server:
    server = Server(dalle, port=0, **options)
    if gate is not None:
        server.worker.on_batch = gate
    return server


def decoded(answer: dict) -> torch.Tensor:
    """The images of a /generate answer ``[N, 3, H, W]``, in request order."""
    ordered = sorted(answer["images"], key=lambda image: image["index"])
    return torch.stack([png_pixels(base64.b64decode(image["png_base64"])) for image in ordered])


def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_generate_gives_generate_images_pngs_with_their_settings(dalle) -> None:
    body = {"prompt": "a red circle", "num_images": 3, "seed": 5, "top_k": 0.5, "temperature": 0.8}
    with serving(dalle) as server:
        status, answer, _ = post(f"{server.url}/generate", body)
        assert status == 200, answer
        again = post(f"{server.url}/generate", body)[1]
        status, page = get(f"{server.url}/")
    assert status == 200 and b"<textarea id=\"prompt\"" in page
    assert [image["index"] for image in answer["images"]] == [0, 1, 2]  # no CLIP: request order
    assert answer["seed"] == 5 and answer["prompt"] == "a red circle" and answer["top_k"] == 0.5
    torch.testing.assert_close(decoded(answer), images_alone(dalle, body), atol=ATOL, rtol=0)
    assert [image["png_base64"] for image in again["images"]] == [
        image["png_base64"] for image in answer["images"]
    ]
    settings = png_settings(base64.b64decode(answer["images"][1]["png_base64"]))
    assert settings == {"prompt": "a red circle", "num_images": 3, "seed": 5, "top_k": 0.5, "top_p": None,
                        "temperature": 0.8, "cond_scale": 1.0, "index": 1, "score": None}


def test_the_job_api_reports_progress_and_serves_each_png(dalle) -> None:
    gate = Gate(opened=False)
    body = {"prompt": "a blue square", "num_images": 3, "seed": 9}
    with serving(dalle, gate, max_batch=2) as server:
        status, answer, _ = post(f"{server.url}/api/jobs", body)
        assert status == 202
        url = f"{server.url}/api/jobs/{answer['id']}"
        gate.reached.acquire(timeout=30)
        running = json.loads(get(url)[1])
        assert running["state"] == "running" and running["progress"] == 0 and running["images"] == []
        gate.event.set()
        wait_for(lambda: json.loads(get(url)[1])["state"] == DONE)
        job = json.loads(get(url)[1])
        pngs = [get(f"{server.url}{image['url']}") for image in job["images"]]
        assert get(f"{server.url}/api/jobs/nope")[0] == 404
        assert get(f"{url}/images/7.png")[0] == 404
    assert gate.batches == [[("a blue square", 0), ("a blue square", 1)], [("a blue square", 2)]]
    assert job["progress"] == 1 and job["settings"]["seed"] == 9
    assert all(status == 200 for status, _ in pngs)
    torch.testing.assert_close(torch.stack([png_pixels(data) for _, data in pngs]), images_alone(dalle, body),
                               atol=ATOL, rtol=0)


def test_concurrent_requests_share_batches_and_nothing_is_mixed(dalle) -> None:
    gate = Gate(opened=False)
    # top_k 0: all 16 codes drawn from (0.9 would keep one of them: the same image for any seed)
    bodies = [{"prompt": f"shape {i}", "num_images": 1 + i % 3, "seed": 100 + i, "top_k": 0}
              for i in range(6)]
    bodies.append({"prompt": "a hot shape", "num_images": 2, "seed": 1, "top_k": 0, "temperature": 2.0})
    with serving(dalle, gate, max_batch=8) as server, ThreadPoolExecutor(len(bodies)) as pool:
        first = pool.submit(post, f"{server.url}/generate", bodies[0])
        gate.reached.acquire(timeout=30)  # the first request runs alone; the others queue behind it
        answers = [pool.submit(post, f"{server.url}/generate", body) for body in bodies[1:]]
        wait_for(lambda: len(server.queue.waiting) == len(bodies) - 1)
        gate.event.set()
        results = [first.result(timeout=60), *(answer.result(timeout=60) for answer in answers)]
    assert all(status == 200 for status, _, _ in results)
    shared = [batch for batch in gate.batches if len({prompt for prompt, _ in batch}) > 1]
    assert shared and max(len(batch) for batch in gate.batches) == 8  # requests shared a batch
    assert all(("a hot shape", 0) not in batch or len(batch) == 2 for batch in gate.batches)
    served = []
    for body, (_, answer, _) in zip(bodies, results, strict=True):
        assert answer["prompt"] == body["prompt"] and len(answer["images"]) == body["num_images"]
        torch.testing.assert_close(decoded(answer), images_alone(dalle, body), atol=ATOL, rtol=0)
        served += list(decoded(answer))
    assert len({image.numpy().tobytes() for image in served}) > len(served) // 2  # images that differ


def test_requests_with_the_same_prompt_queue_side_by_side(dalle) -> None:
    """Jobs are told apart by identity, not by their fields: the same prompt (its token ids a
    tensor) asked several times at once is queued, located, cancelled and served."""
    gate = Gate(opened=False)
    with serving(dalle, gate, max_batch=1) as server:
        ids = [post(f"{server.url}/api/jobs", {"prompt": "a red circle", "seed": seed})[1]["id"]
               for seed in (1, 2, 3)]
        gate.reached.acquire(timeout=30)  # the first runs; the other two wait
        positions = [json.loads(get(f"{server.url}/api/jobs/{job_id}")[1])["position"] for job_id in ids]
        assert positions == [0, 0, 1]
        assert _delete(f"{server.url}/api/jobs/{ids[1]}")[1]["state"] == CANCELLED
        gate.event.set()
        for job_id in (ids[0], ids[2]):
            wait_for(lambda job_id=job_id: server.queue.get(job_id).state == DONE)
    assert [batch[0] for batch in gate.batches] == [("a red circle", 0), ("a red circle", 0)]


@pytest.mark.parametrize(
    "body, field, says",
    [
        ({}, "prompt", "the prompt is empty"),
        ({"prompt": "   "}, "prompt", "the prompt is empty"),
        ({"prompt": "x" * 60}, "prompt", "60 tokens long, more than the model's text_seq_len 48: shorten it"),
        ({"prompt": "a", "num_images": 0}, "num_images", "makes 1 to 5 images per request"),
        ({"prompt": "a", "num_images": 6}, "num_images", "makes 1 to 5 images per request"),
        ({"prompt": "a", "num_images": 2.5}, "num_images", "must be a whole number"),
        ({"prompt": "a", "top_k": 1}, "top_k", "must be in [0, 1)"),
        ({"prompt": "a", "top_p": 0}, "top_p", "must be in (0, 1]"),
        ({"prompt": "a", "temperature": -1}, "temperature", "must be in [0, 10]"),
        ({"prompt": "a", "cond_scale": "big"}, "cond_scale", "must be a number"),
        ({"prompt": "a", "seed": -3}, "seed", "must be in [0, 2**63)"),
        ({"prompt": "a", "steps": 3}, "steps", "unknown field 'steps'"),
        (b"not json", "body", "must be a JSON object"),
        ([1, 2], "body", "must be a JSON object"),
    ],
)
def test_bad_requests_name_the_field_and_the_server_keeps_serving(dalle, body, field, says) -> None:
    with serving(dalle, max_images=5) as server:
        for endpoint in ("/generate", "/api/jobs"):
            status, answer, _ = post(f"{server.url}{endpoint}", body)
            assert status == 400 and answer["field"] == field and says in answer["error"], answer
        status, answer, _ = post(f"{server.url}/generate", {"prompt": "still serving", "seed": 0})
    assert status == 200 and len(answer["images"]) == 1


def test_a_full_queue_answers_busy_with_retry_after(dalle) -> None:
    gate = Gate(opened=False)
    with serving(dalle, gate, max_batch=1, max_waiting=1) as server:
        running = post(f"{server.url}/api/jobs", {"prompt": "first", "seed": 1})[1]["id"]
        gate.reached.acquire(timeout=30)
        waiting = post(f"{server.url}/api/jobs", {"prompt": "second", "seed": 2})[1]["id"]
        status, answer, headers = post(f"{server.url}/generate", {"prompt": "third"})
        assert status == 503 and answer["error"].startswith("busy: 1 requests are waiting; retry")
        assert headers["retry-after"] == "2"
        gate.event.set()
        for job_id in (running, waiting):
            wait_for(lambda job_id=job_id: server.queue.get(job_id).state == DONE)
        assert post(f"{server.url}/generate", {"prompt": "third"})[0] == 200  # room again


def test_cancelled_and_failed_jobs_leave_the_server_serving(dalle, monkeypatch) -> None:
    gate = Gate(opened=False)
    with serving(dalle, gate, max_batch=2) as server:
        # running: cancelled while the worker holds its batch; it stops at the first code
        running = post(f"{server.url}/api/jobs", {"prompt": "running", "num_images": 2, "seed": 1})[1]["id"]
        gate.reached.acquire(timeout=30)
        queued = post(f"{server.url}/api/jobs", {"prompt": "queued", "seed": 2})[1]["id"]
        for job_id in (running, queued):
            status, answer, _ = _delete(f"{server.url}/api/jobs/{job_id}")
            assert status == 200 and answer["state"] == CANCELLED
        gate.event.set()
        status, answer, _ = post(f"{server.url}/generate", {"prompt": "after the cancels", "seed": 3})
        assert status == 200
        assert [batch[0][0] for batch in gate.batches] == ["running", "after the cancels"]  # queued never ran
        assert server.queue.get(running).images == []
        # a batch that raises fails its job with the error; the next request is served
        real_generate = server.worker.generate
        def fail(rows):
            raise RuntimeError("boom")

        monkeypatch.setattr(server.worker, "generate", fail)
        status, answer, _ = post(f"{server.url}/generate", {"prompt": "fails"})
        assert status == 500 and answer["error"] == "generation failed: RuntimeError: boom"
        assert server.queue.get(answer["id"]).state == FAILED
        monkeypatch.setattr(server.worker, "generate", real_generate)
        assert post(f"{server.url}/generate", {"prompt": "served again"})[0] == 200


def test_a_client_that_disconnects_cancels_its_request(dalle) -> None:
    gate = Gate(opened=False)
    with serving(dalle, gate) as server:
        body = json.dumps({"prompt": "nobody waits", "seed": 4}).encode()
        with socket.create_connection((server.host, server.port)) as client:
            client.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            gate.reached.acquire(timeout=30)
        job = next(iter(server.queue.jobs.values()))
        wait_for(lambda: job.state == CANCELLED)
        gate.event.set()
        assert post(f"{server.url}/generate", {"prompt": "next"})[0] == 200
    assert job.images == []


def test_clip_ranks_the_images_best_first(dalle, tmp_path: Path) -> None:
    torch.manual_seed(0)
    clip = CLIP(dim_text=16, dim_image=16, dim_latent=16, num_text_tokens=dalle.num_text_tokens,
                text_enc_depth=1, text_seq_len=dalle.text_seq_len, text_heads=2, visual_enc_depth=1,
                visual_heads=2, visual_image_size=dalle.image_size, visual_patch_size=8).eval()
    body = {"prompt": "a green triangle", "num_images": 4, "seed": 2, "top_k": 0}
    with Server(dalle, clip, port=0) as server:
        answer = post(f"{server.url}/generate", body)[1]
    scores = [image["score"] for image in answer["images"]]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 4
    images = decoded(answer)  # request order
    text = dalle.tokenizer.tokenize(["a green triangle"], dalle.text_seq_len).expand(4, -1)
    with torch.no_grad():
        expected = clip(text, images_alone(dalle, body))
    by_index = {image["index"]: image["score"] for image in answer["images"]}
    torch.testing.assert_close(torch.tensor([by_index[i] for i in range(4)]), expected, atol=1e-3, rtol=0)
    assert images.shape == (4, 3, dalle.image_size, dalle.image_size)


def test_the_command_loads_the_run_and_warns_when_listening_wider(run_dir, monkeypatch, capsys) -> None:
    started = []
    monkeypatch.setattr(server_module.Server, "serve_forever", lambda self: started.append(self))
    assert cli.main(["serve", "--dalle-path", str(run_dir), "--host", "0.0.0.0", "--port", "8123",
                     "--max-images", "3", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "warning: listening on 0.0.0.0: other machines on the network can reach this server" in err
    assert "on http://0.0.0.0:8123" in out
    assert started[0].service.max_images == 3 and started[0].service.dalle.text_seq_len == 48
    assert cli.main(["serve", "--dalle-path", str(run_dir), "--port", "8124", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err and "on http://127.0.0.1:8124" in out
    assert cli.main(["serve", "--dalle-path", str(run_dir), "--max-batch", "0"]) == 2
    assert "--max_batch 0: must be at least 1" in capsys.readouterr().err


def _delete(url: str) -> tuple[int, dict, dict]:
    import urllib.request

    request = urllib.request.Request(url, method="DELETE")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.load(response), dict(response.headers)


def test_load_of_concurrent_clients_loses_and_mixes_nothing(dalle, capsys) -> None:
    """Six clients for 3 s against a queue of 3 (so some are told busy and retry): every request
    answered, with its own images (the PNGs' settings and pixels), batched with others."""
    from dalle_train.serve.load import run_load

    with serving(dalle, max_batch=4, max_waiting=3) as server:
        report = run_load(server.url, clients=6, seconds=3)
        batches = server.worker.batches
    summary = report.summary()
    print(json.dumps(summary))  # the figures, for a reader of the test log
    assert report.problems() == [] and summary["lost"] == 0 and summary["requests"] >= 6
    assert batches < summary["requests"]  # requests shared batches
    for done in report.completed:
        torch.testing.assert_close(decoded(done.answer), images_alone(dalle, done.body), atol=ATOL, rtol=0)
