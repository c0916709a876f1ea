"""Command line: ``python -m deploy.node --config node.yaml [serve | status [--json]]``.

``serve`` (the default) runs the node until SIGTERM / SIGINT. ``status`` reads the queue of the
configured spool (safe while the node runs) and lists studies, jobs and deliveries with their
state. A bad config prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from typing import Any

from core.errors import ConfigError

from .config import load_config
from .queue import Queue


def _when(t: Any) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(float(t), timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [f"{title} ({len(rows)})"]
    for r in cells:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def format_status(snap: dict[str, list[dict[str, Any]]]) -> str:
    """Human-readable tables of the queue snapshot (studies, jobs, deliveries)."""
    studies = _table("studies", ["study_uid", "calling_aet", "instances", "last_received", "state",
                                 "reason"],
                     [[s["study_uid"], s["calling_aet"], s["n_instances"], _when(s["last_received"]),
                       s["state"], s["reason"]] for s in snap["studies"]])
    jobs = _table("jobs", ["id", "study_uid", "state", "trigger", "attempts", "instances", "results",
                           "updated", "started_because", "reason"],
                  [[j["id"], j["study_uid"], j["state"], j["trigger"], j["attempts"], j["n_instances"],
                    j["n_results"], _when(j["updated_at"]), j.get("start_reason"), j["reason"]]
                   for j in snap["jobs"]])
    deliveries = _table("deliveries", ["id", "job", "destination", "state", "attempts",
                                       "next_attempt", "sop_instance_uid", "last_error"],
                        [[d["id"], d["job_id"], d["destination"], d["state"], d["attempts"],
                          _when(d["next_attempt_at"]) if d["state"] == "pending" else "-",
                          d["sop_instance_uid"], d["last_error"]] for d in snap["deliveries"]])
    return "\n\n".join([studies, jobs, deliveries])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.node",
                                     description="DICOM node: receive, analyse, send back.")
    parser.add_argument("--config", required=True, help="path of the node YAML config")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "status"])
    parser.add_argument("--json", action="store_true", help="status as JSON")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "status":
        db = cfg.spool / "queue.sqlite"
        if not db.is_file():
            print(f"no queue yet at {db} (the node has not run with this spool)", file=sys.stderr)
            return 1
        queue = Queue(db)
        try:
            snap = queue.snapshot()
        finally:
            queue.close()
        print(json.dumps(snap, indent=1, default=str) if args.json else format_status(snap))
        return 0
    from .service import Node
    try:
        Node(cfg).serve_forever()
    except OSError as exc:
        print(f"node cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
