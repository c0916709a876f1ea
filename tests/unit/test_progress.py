"""core.progress: step lines when attached, silence otherwise, and the timing table."""

from __future__ import annotations

import io

from core import progress


def test_step_lines_and_table():
    buf = io.StringIO()
    progress.attach(buf, total_steps=2)

    @progress.step("first step")
    def f(x):
        return x + 1

    assert f(1) == 2
    progress.record("second", 2.3)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("[1/2] first step") and lines[0].endswith(" s")
    assert lines[1].startswith("[2/2] second") and lines[1].endswith("2.3 s")
    table = progress.timing_table({"QSM steps (s)": {"mask": 1.0, "star": 2.5}}).splitlines()
    assert table[0].split() == ["step", "seconds"]
    assert table[1].split()[:2] == ["first", "step"] and table[2].split() == ["second", "2.3"]
    assert table[3].split()[0] == "total"
    assert abs(float(table[3].split()[-1]) - (2.3 + progress.steps()[0][1])) < 0.06
    assert table[4] == "QSM steps (s): mask 1.0, star 2.5"
    progress.attach(None)
    assert progress.steps() == []
    progress.record("silent", 1.0)  # nothing attached: recorded, not printed
    assert buf.getvalue().count("\n") == 2 and progress.steps() == [("silent", 1.0)]
    progress.attach(None)
