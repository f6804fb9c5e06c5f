"""Timing on a shared machine: notice when other processes took the CPUs during a measurement.

On 2 cores with 2 torch threads, one other busy process makes every parallel operator wait for
the scheduler: a training step gets 5-25x slower, and the figure says nothing about the code.
`Quiet` reads how long this process's threads sat runnable but not running while a measurement
ran (``run_delay`` in ``/proc/self/task/*/schedstat``, in nanoseconds) and the CPU time the
hypervisor took (steal, ``/proc/stat``). A measurement that waited more than a few percent of its
length is discarded and taken again once the machine is idle, within a total waiting budget;
after the budget is spent, measurements are kept and counted as contended.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
DELAY_FRACTION = 0.03  # of the measurement's wall time
DELAY_SLACK_S = 0.002
STEAL_FRACTION = 0.05
STEAL_SLACK_S = 0.03  # /proc/stat counts in ticks (10 ms) per CPU
IDLE_BUSY_FRACTION = 0.05  # of all CPUs, while this process sleeps


def _proc_stat() -> list[int] | None:
    try:
        with open("/proc/stat") as stat:
            return [int(x) for x in stat.readline().split()[1:9]]
    except OSError:
        return None


def busy_cpu_s() -> float | None:
    """CPU seconds all processes have used (non-idle, steal included), or None off Linux."""
    fields = _proc_stat()
    if fields is None:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / TICK


def steal_s() -> float:
    fields = _proc_stat()
    return 0.0 if fields is None else fields[7] / TICK


def run_delay_s() -> float:
    """Seconds this process's threads have spent runnable but waiting for a CPU."""
    total = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0.0
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as stat:
                total += int(stat.read().split()[1])
        except (OSError, IndexError, ValueError):
            pass
    return total / 1e9


@dataclass
class Quiet:
    wait_budget_s: float = 180.0
    waited_s: float = 0.0
    discarded: int = 0
    contended_kept: int = 0

    def snapshot(self) -> tuple[float, float, float]:
        return time.perf_counter(), run_delay_s(), steal_s()

    def contended(self, before, after) -> bool:
        """Whether this process waited for the CPUs between two snapshots."""
        wall = after[0] - before[0]
        delay, steal = after[1] - before[1], after[2] - before[2]
        return delay > DELAY_FRACTION * wall + DELAY_SLACK_S or steal > STEAL_FRACTION * wall + STEAL_SLACK_S

    def _busy_while_sleeping(self, window_s: float) -> tuple[bool, float]:
        before, t0 = busy_cpu_s(), time.perf_counter()
        time.sleep(window_s)
        after, t1 = busy_cpu_s(), time.perf_counter()
        cpus = os.cpu_count() or 1
        busy = before is not None and after is not None and (
            after - before > IDLE_BUSY_FRACTION * cpus * (t1 - t0) + STEAL_SLACK_S
        )
        return busy, t1 - t0

    def wait_idle(self, settle_s: float = 2.0, window_s: float = 0.5) -> bool:
        """Wait until other processes left the CPUs alone for ``settle_s``; False if the budget
        ran out first."""
        quiet_for = 0.0
        while quiet_for < settle_s:
            if self.waited_s >= self.wait_budget_s:
                return False
            busy, seconds = self._busy_while_sleeping(window_s)
            self.waited_s += seconds
            quiet_for = 0.0 if busy else quiet_for + seconds
        return True

    def time(self, fn) -> float:
        """Wall seconds of ``fn()``, measured again (after waiting) while others used the CPUs."""
        while True:
            before = self.snapshot()
            fn()
            after = self.snapshot()
            seconds = after[0] - before[0]
            if not self.contended(before, after):
                return seconds
            if self.waited_s >= self.wait_budget_s:
                self.contended_kept += 1
                return seconds
            self.discarded += 1
            self.wait_idle()

    def summary(self) -> dict:
        return {
            "discarded_samples": self.discarded,
            "contended_samples_kept": self.contended_kept,
            "waited_s": round(self.waited_s, 1),
            "wait_budget_s": self.wait_budget_s,
        }
