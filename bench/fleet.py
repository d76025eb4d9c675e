"""Fleet benchmark: `selfheal simulate` twice on the same scenario and seed, side by side.

    .venv/bin/python bench/fleet.py [SCENARIO] [--installations 1000] [--tenants 50]
        [--interval 10] [--faulty-share 0.05] [--duration 600] [--seed 7]
        [--only candidate|baseline]

- candidate: plugins embed plugin_client as shipped (it reports trouble at once: the early
  report);
- baseline: the same plugins reporting only on their heartbeat schedule (`--no-early-report`),
  as a client without the early report would.

Each run starts its own control plane (API, a worker, the reference services) on
DATABASE_URL / REDIS_URL or on embedded services, with every control-plane setting at its
default but the heartbeat interval. Printed: the figures of the issue's benchmark (MTTD and
MTTR p50 / p95 / max, false incidents, oscillations, autopatch success and rollback rates,
commands refused, bad releases rolled back and quarantined), MTTD p95 per fault kind, and the
heartbeat rate. The JSON reports are kept in bench/results/. A benchmark prints figures; it is
not a test."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SELFHEAL = [sys.executable, "-m", "app.cli"]


def run(args: argparse.Namespace, name: str, early: bool) -> dict[str, Any]:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    report = RESULTS / f"fleet-{name}-{args.installations}-{stamp}.json"
    cmd = [
        *SELFHEAL,
        "simulate",
        args.scenario,
        "--installations",
        str(args.installations),
        "--tenants",
        str(args.tenants),
        "--interval",
        str(args.interval),
        "--faulty-share",
        str(args.faulty_share),
        "--duration",
        str(args.duration),
        "--seed",
        str(args.seed),
        "--report",
        str(report),
        "--early-report" if early else "--no-early-report",
    ]
    print(f"[bench] {name}: {' '.join(cmd[2:])}", flush=True)
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    took = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(
            f"[bench] {name} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    print(f"[bench] {name}: done in {took:.0f} s, report {report.relative_to(ROOT)}", flush=True)
    data: dict[str, Any] = json.loads(report.read_text())
    return data


def trio(figures: dict[str, Any] | None) -> str:
    if not figures or figures.get("p50") is None:
        return "-"
    return f"{figures['p50']:.1f} / {figures['p95']:.1f} / {figures['max']:.1f}"


def rate(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def rows(report: dict[str, Any]) -> dict[str, str]:
    beats = report.get("heartbeats", {})
    duration = float(report.get("duration_s") or 1)
    bad = report.get("bad_releases", {})
    out = {
        "installations / interval": f"{report['installations']} / {report['interval_s']} s",
        "heartbeats sent (failed), per s": (
            f"{beats.get('sent', 0)} ({beats.get('failed', 0)}),"
            f" {beats.get('sent', 0) / duration:.0f}/s"
        ),
        "incidents": str(report["incidents"]),
        "false incidents": str(report["false_incidents"]),
        "oscillations": str(report["oscillations"]),
        "MTTD p50 / p95 / max (s)": trio(report["mttd_s"]),
        "MTTR p50 / p95 / max (s)": trio(report["mttr_s"]),
        "autopatch success / rollback rate": (
            f"{rate(report['autopatch_success_rate'])} / {rate(report['rollback_rate'])}"
        ),
        "commands refused": str(report["commands_refused"]),
        "bad releases rolled back / quarantined": ", ".join(
            f"{version}: {info['rolled_back_from']}/{info['deployed_by_operators']}"
            f" {'yes' if info['quarantined'] else 'NO'}"
            for version, info in bad.items()
        )
        or "-",
    }
    for kind, info in sorted(report.get("by_fault_kind", {}).items()):
        mttd, mttr = info.get("mttd_s"), info.get("mttr_s")
        if mttd and mttd.get("p95") is not None:
            out[f"  {kind}: MTTD p95, MTTR p95 (s)"] = (
                f"{mttd['p95']:.1f}, {mttr['p95']:.1f}"
                if mttr and mttr.get("p95") is not None
                else f"{mttd['p95']:.1f}, -"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", nargs="?", default="benchmark")
    parser.add_argument("--installations", type=int, default=1000)
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--faulty-share", type=float, default=0.05)
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--only", choices=("candidate", "baseline"))
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, str]] = {}
    if args.only != "baseline":
        runs["candidate (early report)"] = rows(run(args, "candidate", early=True))
    if args.only != "candidate":
        runs["baseline (on schedule)"] = rows(run(args, "baseline", early=False))
    names = list(runs)
    keys = list(dict.fromkeys(key for table in runs.values() for key in table))
    width = max(len(key) for key in keys)
    columns = [max(len(name), *(len(t.get(k, "")) for k in keys)) for name, t in runs.items()]
    print()
    print(
        f"fleet benchmark: scenario {args.scenario}, seed {args.seed}, faulty share {args.faulty_share}"
    )
    print(" " * width + "  " + "  ".join(n.ljust(c) for n, c in zip(names, columns, strict=True)))
    for key in keys:
        cells = [runs[n].get(key, "").ljust(c) for n, c in zip(names, columns, strict=True)]
        print(key.ljust(width) + "  " + "  ".join(cells))


if __name__ == "__main__":
    main()
