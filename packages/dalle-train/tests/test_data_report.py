"""SkipReport: counts per kind, one warning per file, the summary line, metrics, worker queues."""

from __future__ import annotations

import logging

from dalle_train.data import report as report_module
from dalle_train.data.report import KINDS, SkipReport


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dalle_train.data"]


def test_counts_per_kind_and_warns_once_per_file(caplog):
    caplog.set_level(logging.WARNING)
    report = SkipReport()
    assert report.add("corrupt_image", "/d/a.png", "truncated")
    assert report.add("missing_caption", "/d/b.png", "no caption file b.txt next to it")
    assert report.add("missing_caption", "/d/c.png", "no caption file c.txt next to it")
    assert not report.add("corrupt_image", "/d/a.png", "truncated")  # again in a later epoch
    assert messages(caplog) == [
        "skipping /d/a.png: truncated",
        "skipping /d/b.png: no caption file b.txt next to it",
        "skipping /d/c.png: no caption file c.txt next to it",
    ]
    assert report.count() == 3 and report.count("missing_caption") == 2 and report.count("empty_caption") == 0
    assert report.sources("missing_caption") == ["/d/b.png", "/d/c.png"]
    assert report.summary() == "skipped 3 samples: 1 corrupt image, 2 without captions"


def test_as_dict_has_every_kind_and_the_total():
    report = SkipReport()
    report.add("empty_caption", "/d/e.txt", "blank")
    report.add("odd_kind", "/d/x", "something else")
    counts = report.as_dict()
    assert set(KINDS) <= set(counts) and counts["empty_caption"] == 1 and counts["corrupt_image"] == 0
    assert counts["odd_kind"] == 1 and counts["total"] == 2
    assert report.summary() == "skipped 2 samples: 1 empty caption, 1 odd kind"


def test_nothing_skipped():
    report = SkipReport()
    assert report.summary() == "skipped no samples" and report.as_dict()["total"] == 0


def test_limit_caps_warnings_but_not_counts(caplog):
    caplog.set_level(logging.WARNING)
    report = SkipReport(limit=2)
    for i in range(5):
        report.add("missing_image", f"/d/{i}.txt", "no image")
    assert len(messages(caplog)) == 2 and report.count("missing_image") == 5
    assert report.summary() == "skipped 5 samples: 5 captions without images (3 not named in warnings)"


def test_a_worker_queues_and_the_main_process_merges(caplog, monkeypatch):
    caplog.set_level(logging.WARNING)
    in_worker = SkipReport()
    monkeypatch.setattr(report_module, "get_worker_info", lambda: object())  # as inside a worker
    in_worker.add("corrupt_image", "/d/a.png", "truncated")
    in_worker.add("corrupt_image", "/d/a.png", "truncated")
    monkeypatch.undo()
    assert messages(caplog) == [] and in_worker.count() == 0
    events = in_worker.drain()
    assert len(events) == 2 and in_worker.drain() == []
    main = SkipReport()
    main.merge(events)
    assert main.count("corrupt_image") == 1 and messages(caplog) == ["skipping /d/a.png: truncated"]
