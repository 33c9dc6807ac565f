"""Atomic file writes: the bytes go to a temporary file in the target's directory, which is synced and
renamed over the target only when complete, so a crash or an error never leaves a half-written file
under the final name (and never destroys the previous one)."""
import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_write(path):
    """``with atomic_write(path) as f: f.write(...)``: f is a binary file; on success it replaces
    ``path`` (mode 0644), on an exception the temporary file is removed and the exception re-raised."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
