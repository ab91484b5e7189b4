"""Real storage faults for tests: a tiny tmpfs that can be filled up or remounted read-only.

Permission bits prove nothing here (the tests run as root, and root ignores them), so the faults
are made by the kernel itself: `ENOSPC` from a full tmpfs, `EROFS` from a read-only remount.
Mounting needs root (CAP_SYS_ADMIN), as the test suite has.
"""

import subprocess
from pathlib import Path
from types import TracebackType


class TinyTmpfs:
    """A tmpfs of `size_kb` mounted at `path` for the duration of a `with` block."""

    def __init__(self, path: Path, size_kb: int = 64) -> None:
        self.path = path
        self._size_kb = size_kb
        self._filler = path / "filler.bin"

    def __enter__(self) -> "TinyTmpfs":
        self.path.mkdir(parents=True, exist_ok=True)
        _mount("-t", "tmpfs", "-o", f"size={self._size_kb}k,mode=0700", "tmpfs", str(self.path))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)

    def fill(self) -> None:
        """Use up every free block: the next write that needs one fails with ENOSPC."""
        with self._filler.open("ab", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * 4096)
            except OSError:
                pass

    def free(self) -> None:
        self._filler.unlink(missing_ok=True)

    def read_only(self) -> None:
        _mount("-o", "remount,ro", str(self.path))

    def writable(self) -> None:
        _mount("-o", "remount,rw", str(self.path))


def _mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"mount {' '.join(args)} failed ({result.stderr.strip()}); "
            "the storage fault tests need root to mount a tmpfs"
        )
