"""Files that are whole or absent: the atomic write every output uses, fsync, and checksums.

    write_atomic(run_dir / "config.yaml", text)   # a reader sees the old file or the new one
    sha256_file(path)                             # hex digest, read in 1 MiB blocks

A kill at any instant leaves either the previous file or the new one, never a half-written file:
the text goes to a hidden temporary file beside the target (`.<name>.tmp-<pid>`), is fsync'ed,
and os.replace puts it in place in one step; the folder is fsync'ed after, so the rename itself
survives a power cut where the filesystem allows.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def fsync_file(path: Path) -> None:
    """Flush a file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames into it) to the disk, where the platform allows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_synced(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` and fsync it (not atomic: for files inside a folder that is
    itself renamed into place, such as a checkpoint's)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path | str, text: str) -> Path:
    """Replace `path` with `text` (UTF-8) in one step (temporary file + os.replace); returns the
    path. OSError (e.g. a folder that does not exist) passes through."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_text_synced(tmp, text)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """The file's sha256, hex; read in blocks of `chunk` bytes (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict, path: Path, metadata: dict) -> None:
    """safetensors' save_file, then the file mode any other file gets (0o666 minus the umask):
    save_file (0.8) writes the file owner-only (0600), so a checkpoint or an export shared with a
    group, a container or a server that reads as another user would not load."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    try:
        os.chmod(path, 0o666 & ~umask())
    except OSError:  # a filesystem without modes (some network mounts): the file is written all the same
        pass
