"""Command line: a bad config is one line and exit code 2; ``status`` lists studies, jobs and
deliveries from the queue; log lines are JSON."""

from __future__ import annotations

import io
import json
import logging
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import yaml

from deploy.node import logs
from deploy.node.__main__ import main
from deploy.node.queue import InstanceRecord, Queue


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_bad_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"ae_title": "NODE", "port": 99999, "spool": "s"}))
    code, out, err = run(["--config", str(cfg), "status"])
    assert code == 2 and out == ""
    assert err == "config error: port: port must be 1-65535, got 99999\n"


def test_status_lists_studies_jobs_and_deliveries(tmp_path: Path) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"ae_title": "NODE", "port": 104, "spool": "spool"}))
    code, _, err = run(["--config", str(cfg), "status"])
    assert code == 1 and "no queue yet" in err
    (tmp_path / "spool").mkdir()
    q = Queue(tmp_path / "spool" / "queue.sqlite")
    q.record_instance(InstanceRecord("1.2.3.1", "1.2.3", "1.2.3.9", "1.2", "1.2", "p", "h", 1, "SCANNER"), 0.0)
    q.close()
    code, out, _ = run(["--config", str(cfg), "status"])
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "studies (1)"
    assert lines[2].split() == ["1.2.3", "SCANNER", "1", "1970-01-01", "00:00:00", "receiving", "-"]
    assert "jobs (1)" in lines and "deliveries (0)" in lines
    code, out, _ = run(["--config", str(cfg), "status", "--json"])
    snap = json.loads(out)
    assert [j["state"] for j in snap["jobs"]] == ["received"]
    assert snap["studies"][0]["n_instances"] == 1


def test_log_lines_are_json_with_study_and_calling_ae(tmp_path: Path) -> None:
    logs.configure(tmp_path / "node.jsonl", stderr=False)
    try:
        logs.log_event("instance_stored", study_uid="1.2.3", calling_aet="SCANNER", skipped=None)
        logging.getLogger("pynetdicom.assoc").warning("Association Aborted")
    finally:
        logs.configure(None)
        logging.captureWarnings(False)  # undo the process-wide changes for the other tests
        for name in ("pynetdicom", "pydicom", "py.warnings"):
            lib = logging.getLogger(name)
            lib.handlers = [h for h in lib.handlers if type(h).__name__ != "_JSONHandler"]
            lib.propagate = True
            lib.setLevel(logging.NOTSET)
    lines = [json.loads(x) for x in (tmp_path / "node.jsonl").read_text().splitlines()]
    assert [(x["event"], x["level"]) for x in lines] == [("instance_stored", "info"),
                                                          ("library_log", "warning")]
    assert lines[0]["study_uid"] == "1.2.3" and lines[0]["calling_aet"] == "SCANNER"
    assert "skipped" not in lines[0]
    assert lines[1]["message"] == "Association Aborted" and lines[1]["logger"] == "pynetdicom.assoc"
