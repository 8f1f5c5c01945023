"""Where a command's CPU goes, by kind of process: runs the command (the test suite, a bench) and samples
every process on the machine every ``--every`` seconds (Linux ``/proc``: user + system time), then prints
the CPU-seconds each kind used while it ran: pytest workers, each Ray actor class (``ray::<Class>``, the
process title Ray gives it), raylets, GCS, dashboard, log monitor, MLflow servers, montage commands, ...

    python bench/process_cpu.py [--every 2] [--json out.json] -- pytest -p no:cacheprovider

A process that lives less than one sampling interval is missed, and the CPU a process uses between its
last sample and its exit is not counted: the total is a lower bound (over a suite run here it counted 96 %
of the CPU time vmstat reported busy). Run it alone on the machine: every process is counted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK")
KINDS = (  # (part of the command line, kind), the first match wins
    ("raylet/raylet", "raylet"),
    ("gcs_server", "gcs_server"),
    ("dashboard/agent.py", "dashboard agent"),
    ("dashboard.py", "dashboard"),
    ("ray-dashboard-", "dashboard modules"),
    ("runtime_env/agent", "runtime-env agent"),
    ("log_monitor", "log monitor"),
    ("autoscaler/_private/monitor.py", "autoscaler monitor"),
    ("ray.util.client.server", "ray client server"),
    ("default_worker.py", "ray worker (untitled)"),
    ("setup_worker.py", "ray worker (untitled)"),
    ("huey", "mlflow job consumers"),
    ("uvicorn", "mlflow server"),
    ("gunicorn", "mlflow server"),
    ("mlflow server", "mlflow server"),
    ("exec(eval(sys.stdin", "pytest"),
    ("pytest", "pytest"),
    ("montage", "montage command"),
    ("chrom", "chromium"),
    ("prometheus", "prometheus"),
)


def kind(cmdline: str) -> str:
    if not cmdline:
        return "kernel thread or zombie"
    if cmdline.startswith("ray::"):
        return "ray::" + cmdline[5:].split(" ")[0].split(".")[0][:48]
    return next((k for part, k in KINDS if part in cmdline), "other: " + Path(cmdline.split(" ")[0]).name[:30])


class Sampler(threading.Thread):
    """Every ``every`` seconds, each process's CPU time and latest command line; CPU used before the first
    sample is not counted (processes already running)."""

    def __init__(self, every: float) -> None:
        super().__init__(daemon=True)
        self.every, self.done = every, threading.Event()
        self.seen: dict[tuple[str, str], list] = {}  # (pid, start time) -> [cpu at first sample, cpu, cmdline]

    def sweep(self, first: bool) -> None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                cpu = (int(stat[11]) + int(stat[12])) / HZ
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ").strip()
            except (OSError, IndexError, ValueError):  # gone while read
                continue
            key = (entry, stat[19])
            if key not in self.seen:
                self.seen[key] = [cpu if first else 0.0, cpu, cmd]
            else:
                self.seen[key][1] = cpu
                self.seen[key][2] = cmd or self.seen[key][2]  # keep the title a process had before it became a zombie

    def run(self) -> None:
        first = True
        while not self.done.is_set():
            self.sweep(first)
            first = False
            self.done.wait(self.every)

    def totals(self) -> tuple[Counter, Counter]:
        cpu, count = Counter(), Counter()
        for base, now, cmd in self.seen.values():
            k = kind(cmd)
            cpu[k] += now - base
            count[k] += 1
        return cpu, count


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--every", type=float, default=2.0, help="seconds between samples")
    p.add_argument("--json", help="also write the table here")
    p.add_argument("--top", type=int, default=30, help="kinds to print")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to run after --")
    sampler = Sampler(args.every)
    sampler.start()
    started = time.time()
    rc = subprocess.call(command)
    wall = time.time() - started
    sampler.done.set()
    sampler.join()
    cpu, count = sampler.totals()
    total = sum(cpu.values())
    cores = os.cpu_count() or 1
    print(f"\n{' '.join(command)}: exit {rc}, {wall:.0f} s wall, {total:.0f} CPU-s counted "
          f"({total / (wall * cores):.0%} of {cores} cores)")  # fmt: skip
    print(f"{'CPU-s':>8} {'share':>6} {'procs':>6}  kind")
    for k, v in cpu.most_common(args.top):
        print(f"{v:8.1f} {v / total:6.1%} {count[k]:6d}  {k}")
    if args.json:
        rows = [{"kind": k, "cpu_s": round(v, 1), "processes": count[k]} for k, v in cpu.most_common()]
        Path(args.json).write_text(json.dumps({"command": command, "wall_s": wall, "cpu_s": total, "kinds": rows}))
    return rc


if __name__ == "__main__":
    sys.exit(main())
