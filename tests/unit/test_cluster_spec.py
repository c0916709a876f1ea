"""``--cluster`` parsing, atomic writes and the in-process subject loop of :mod:`training.cluster`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from training import cluster as C


def test_parse_local_and_tcp():
    assert C.parse_cluster("local:3") == C.ClusterSpec("local", workers=3)
    n = C.parse_cluster("local").workers
    assert n == C.default_workers() and 1 <= n <= (C.os.cpu_count() or 1)
    assert C.parse_cluster("tcp://127.0.0.1:8786") == C.ClusterSpec("tcp", address="tcp://127.0.0.1:8786")
    assert C.parse_cluster(" tcp://sched-0.cluster.local:8786 ").address == "tcp://sched-0.cluster.local:8786"
    assert C.parse_cluster("tcp://[::1]:8786").kind == "tcp"


@pytest.mark.parametrize("spec", ["", "local:0", "local:x", "local:-1", "locale", "tcp://host", "tcp://:8786",
                                  "http://127.0.0.1:8786", "tcp://127.0.0.1:0", "tcp://127.0.0.1:70000",
                                  "127.0.0.1:8786"])
def test_bad_spec_is_one_clear_line(spec):
    with pytest.raises(C.ClusterSpecError) as e:
        C.parse_cluster(spec)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"--cluster {spec!r}")


def test_cli_refuses_bad_spec_before_any_work(tmp_path, capsys):
    from training import dataset as D
    from training import predict as P

    for main, args in ((P.main, ["--cohort", str(tmp_path), "--out", str(tmp_path / "o")]),
                       (D.main, ["--out", str(tmp_path / "d"), "--subjects", "1"])):
        with pytest.raises(SystemExit) as e:
            main([*args, "--cluster", "slurm://x"])
        assert e.value.code == 2
        assert "expected 'local', 'local:N' or 'tcp://HOST:PORT'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


def test_in_process_path_does_not_import_dask(tmp_path):
    import subprocess

    code = ("import sys; from training import cluster as C; "
            "o = C.run_subjects(['a'], lambda s: {'x': 1}, completed=lambda s: None, progress=False); "
            "assert o[0].status == 'done'; print('distributed' in sys.modules, 'dask' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2],
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-2:] == ["False", "False"]


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "x.json"
    C.write_text_atomic(p, "old\n")

    def boom(fh):
        fh.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        C.atomic_write(p, boom)
    assert p.read_text() == "old\n"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["x.json"]


def test_run_subjects_skips_reports_failures_and_goes_on(capsys):
    ran = []

    def task(s):
        ran.append(s)
        if s == "b":
            raise ValueError("corrupt DICOM\nsecond line")
        return {"n": len(s)}

    out = C.run_subjects(["a", "b", "c", "d"], task, completed=lambda s: {"n": 0} if s == "c" else None,
                         progress=False)
    assert ran == ["a", "b", "d"]
    assert [(o.subject, o.status) for o in out] == [("a", "done"), ("b", "failed"), ("c", "skipped"), ("d", "done")]
    assert out[1].error == "ValueError: corrupt DICOM" and out[2].record == {"n": 0}
    capsys.readouterr()
    assert C.summarise(out) == 1
    err = capsys.readouterr().err
    assert "2 subject(s) run, 1 already complete (skipped), 1 failed" in err
    assert "error: b: ValueError: corrupt DICOM" in err
    assert C.summarise([o for o in out if o.status != "failed"]) == 0
