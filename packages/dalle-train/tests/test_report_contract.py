"""The skip report's promises, checked exactly: every kind counted on its own (an unseen kind is
0), the summary's singular and plural words and its count of files left out of the warnings,
one warning per file whichever worker found it, and what `SkipReport.add` answers."""

from __future__ import annotations

import logging

import pytest

from dalle_train.data import report as report_module
from dalle_train.data.report import KINDS, SkipReport


def warned(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dalle_train.data"]


def test_counts_per_kind_and_in_all() -> None:
    report = SkipReport()
    assert report.add("corrupt_image", "/d/a.png", "truncated") is True
    assert report.add("corrupt_image", "/d/b.png", "truncated") is True
    assert report.add("empty_caption", "/d/c.txt", "blank") is True
    assert report.add("empty_caption", "/d/c.txt", "blank") is False  # counted once
    assert report.count() == 3
    assert report.count("corrupt_image") == 2 and report.count("empty_caption") == 1
    for kind in ("missing_image", "never_seen"):
        assert report.count(kind) == 0 and report.count(kind) is not None
    assert report.as_dict() == {**dict.fromkeys(KINDS, 0), "corrupt_image": 2, "empty_caption": 1, "total": 3}


def test_summary_words_and_the_files_left_out_of_the_warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    report = SkipReport(limit=2)
    for i in range(5):
        report.add("missing_caption", f"/d/{i}.png", "no caption")
    report.add("corrupt_image", "/d/x.png", "truncated")
    assert len(warned(caplog)) == 3  # 2 of the 5, and the 1
    assert report.summary() == ("skipped 6 samples: 1 corrupt image, 5 without captions "
                                "(3 not named in warnings)")
    under_the_limit = SkipReport(limit=2)
    under_the_limit.add("missing_image", "/d/a.txt", "no image")
    under_the_limit.add("unreadable_caption", "/d/b.txt", "not UTF-8")
    under_the_limit.add("unreadable_caption", "/d/c.txt", "not UTF-8")
    assert under_the_limit.summary() == "skipped 3 samples: 1 caption without an image, 2 unreadable captions"
    one = SkipReport()
    one.add("empty_caption", "/d/e.txt", "blank")
    assert one.summary() == "skipped 1 sample: 1 empty caption"


def test_a_file_found_by_several_workers_is_warned_about_once(caplog: pytest.LogCaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(report_module, "get_worker_info", lambda: object())  # as inside a worker
    first, second = SkipReport(), SkipReport()
    assert first.add("corrupt_image", "/d/a.png", "truncated") is True  # queued: not reported before
    assert second.add("corrupt_image", "/d/a.png", "truncated") is True
    assert second.add("missing_image", "/d/b.txt", "no image b.png next to it") is True
    events = [*first.drain(), *second.drain()]
    monkeypatch.undo()
    assert warned(caplog) == []
    main = SkipReport()
    main.merge(events)
    assert warned(caplog) == ["skipping /d/a.png: truncated", "skipping /d/b.txt: no image b.png next to it"]
    assert main.count() == 2 and main.sources("missing_image") == ["/d/b.txt"]
    assert main.summary() == "skipped 2 samples: 1 corrupt image, 1 caption without an image"
    assert main.add("corrupt_image", "/d/a.png", "truncated") is False  # already reported
