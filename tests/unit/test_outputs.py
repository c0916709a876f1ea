"""All-or-nothing output staging."""

from core.outputs import StagedOutput


def test_commit_moves_everything_and_removes_staging(tmp_path):
    stage = StagedOutput(tmp_path / "out")
    (stage.path / "a.json").write_text("1")
    (stage.path / "dicom").mkdir()
    (stage.path / "dicom" / "x.dcm").write_bytes(b"x")
    moved = stage.commit()
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in moved) == ["a.json", "dicom/x.dcm"]
    assert not stage.path.exists()
    assert (tmp_path / "out" / "dicom" / "x.dcm").read_bytes() == b"x"


def test_abort_leaves_final_folder_as_it_was(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    stage = StagedOutput(final)
    (stage.path / "half.dcm").write_bytes(b"partial")
    stage.abort()
    assert [p.name for p in final.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
