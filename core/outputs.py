"""All-or-nothing output folders: nothing half-written is ever left in OUT.

The app writes every result into a hidden staging folder beside its final place (same file
system, so moves are renames). Only when the whole run succeeded are the files moved into OUT and
the folder fsynced; on failure the staging folder is removed and OUT is left as it was. A PACS
node watching OUT therefore sees either no results or the complete set.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames into it survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StagedOutput:
    """A staging folder that becomes the contents of ``final_dir`` on :meth:`commit`.

    Example:
        >>> stage = StagedOutput(Path("out"))          # doctest: +SKIP
        >>> (stage.path / "summary.json").write_text("{}")   # doctest: +SKIP
        >>> stage.commit()                              # doctest: +SKIP
    """

    def __init__(self, final_dir: Path) -> None:
        self.final_dir = Path(final_dir).resolve()
        self.final_dir.parent.mkdir(parents=True, exist_ok=True)
        self.path = self.final_dir.parent / f".{self.final_dir.name}.staging-{uuid.uuid4().hex[:12]}"
        self.path.mkdir()
        self._done = False

    def commit(self) -> list[Path]:
        """Move every staged file into ``final_dir`` (overwriting same-named files); return them."""
        if self._done:
            raise RuntimeError("staged output already committed or aborted")
        self.final_dir.mkdir(parents=True, exist_ok=True)
        moved = []
        for src in sorted(p for p in self.path.rglob("*") if p.is_file()):
            with open(src, "rb") as fh:
                os.fsync(fh.fileno())
            dst = self.final_dir / src.relative_to(self.path)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            moved.append(dst)
        for d in sorted({p.parent for p in moved} | {self.final_dir}):
            fsync_dir(d)
        shutil.rmtree(self.path, ignore_errors=True)
        self._done = True
        return moved

    def abort(self) -> None:
        """Discard everything staged; ``final_dir`` is untouched."""
        shutil.rmtree(self.path, ignore_errors=True)
        self._done = True
