"""Locations: a local path or a URI of any file system that pyarrow or fsspec knows.

    loc = storage.normalize("s3://bucket/ml100k")      # URIs stay URIs; local paths become absolute
    storage.read_text(storage.join(loc, "manifest.json"))

Every dataset, run storage, search, checkpoint and output location in gtc-ray goes through here.
pyarrow's own file systems come first (local, `s3://`, `gs://`, `abfs://`, `hdfs://`); any other
scheme goes to fsspec through pyarrow's FSSpecHandler. S3-compatible stores are configured by the
standard variables only (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_DEFAULT_REGION`), which pyarrow reads itself.

Writes never leave a half-written object for a reader: a local file is written beside its target
and renamed over it; an object store PUT is atomic per object. A directory is published with
`publish_dir`: built locally, then renamed into place (local) or uploaded with its commit file
(e.g. manifest.json) last, so a reader that checks the commit file never sees part of it.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from gtc_ray.errors import GtcInputError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_uri(loc) -> bool:
    """True for `scheme://...` (file:// included), false for plain local paths."""
    return isinstance(loc, str) and bool(_SCHEME.match(loc))


def is_local(loc) -> bool:
    return not is_uri(loc) or str(loc).startswith("file:")


def normalize(loc) -> str:
    """The canonical form of a location: an absolute local path (file:// URIs included) or the URI
    without a trailing slash."""
    loc = os.fspath(loc)
    if loc.startswith("file:"):
        from urllib.parse import unquote, urlparse
        u = urlparse(loc)  # file:///x, file://localhost/x, file:/x
        if u.netloc not in ("", "localhost"):
            raise GtcInputError(f"location {loc}", f"names another host ({u.netloc})",
                                "use file:///absolute/path for a local (or mounted) path")
        return str(Path(unquote(u.path)).absolute())
    if is_uri(loc):
        scheme, rest = loc.split("://", 1)
        return f"{scheme}://{rest.rstrip('/')}" if rest.rstrip("/") else loc
    return str(Path(loc).absolute())


def join(loc, *parts: str) -> str:
    loc = normalize(loc)
    if is_uri(loc):
        return "/".join([loc.rstrip("/")] + [p.strip("/") for p in parts if p])
    return str(Path(loc, *parts))


def name(loc) -> str:
    return normalize(loc).rstrip("/").rsplit("/", 1)[-1]


def local_path(loc) -> Path | None:
    """The local path of a local location, else None."""
    loc = normalize(loc)
    return None if is_uri(loc) else Path(loc)


@functools.lru_cache(maxsize=32)
def _fs_for(root: str) -> pafs.FileSystem:
    try:
        fs, _ = pafs.FileSystem.from_uri(root)
        return fs
    except ValueError:  # pyarrow's ArrowInvalid: a scheme it does not know
        pass
    import fsspec
    scheme = root.split("://", 1)[0]
    try:
        return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme)))
    except (ValueError, ImportError) as e:  # unknown protocol, or its fsspec package is missing
        raise GtcInputError(f"location {root}", f"has a scheme no file system here knows ({e})",
                            "use a local path, file://, s3://, gs:// or abfs://, or install the fsspec "
                            f"package for {scheme}://") from None


def filesystem(loc) -> tuple[pafs.FileSystem, str]:
    """(pyarrow file system, path inside it) for a location."""
    loc = normalize(loc)
    if not is_uri(loc):
        return pafs.LocalFileSystem(), loc
    scheme, rest = loc.split("://", 1)
    root = f"{scheme}://{rest.split('/', 1)[0]}"  # one client per bucket/container
    fs = _fs_for(root)
    if isinstance(fs, pafs.PyFileSystem):
        return fs, rest if scheme != "memory" else "/" + rest
    _, path = pafs.FileSystem.from_uri(loc)
    return fs, path


def describe_error(loc, e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:300]


def exists(loc) -> bool:
    fs, p = filesystem(loc)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_file(loc) -> bool:
    fs, p = filesystem(loc)
    return fs.get_file_info(p).type == pafs.FileType.File


def is_dir(loc) -> bool:
    """A directory, or (object stores) a prefix with at least one object under it."""
    fs, p = filesystem(loc)
    t = fs.get_file_info(p).type
    if t == pafs.FileType.Directory:
        return True
    if t == pafs.FileType.NotFound and is_uri(normalize(loc)):
        return bool(listdir(loc))
    return False


def listdir(loc) -> list[str]:
    """Names directly under a directory or prefix (empty if there is none)."""
    fs, p = filesystem(loc)
    try:
        infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(i.base_name for i in infos)


def walk_files(loc) -> list[str]:
    """Paths of every file under a directory or prefix, relative to it, '/'-separated."""
    fs, p = filesystem(loc)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True, allow_not_found=True))
    base = p.rstrip("/") + "/"
    return sorted(i.path[len(base):] for i in infos if i.type == pafs.FileType.File)


def read_bytes(loc) -> bytes:
    fs, p = filesystem(loc)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_text(loc) -> str:
    return read_bytes(loc).decode()


def open_input(loc):
    """A seekable binary file (for pyarrow.parquet and torch.load)."""
    fs, p = filesystem(loc)
    return fs.open_input_file(p)


def write_bytes(loc, data: bytes) -> None:
    """Write a whole file so that a reader sees the old content or the new one, never a part."""
    lp = local_path(loc)
    if lp is not None:
        lp.parent.mkdir(parents=True, exist_ok=True)
        tmp = lp.with_name(f".{lp.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        os.replace(tmp, lp)
        return
    fs, p = filesystem(loc)
    with fs.open_output_stream(p) as f:  # one PUT: atomic per object
        f.write(data)


def write_text(loc, text: str) -> None:
    write_bytes(loc, text.encode())


def delete(loc) -> None:
    """Remove a file or a whole directory/prefix; nothing if it is absent."""
    fs, p = filesystem(loc)
    t = fs.get_file_info(p).type
    if t == pafs.FileType.File:
        fs.delete_file(p)
    elif t == pafs.FileType.Directory or (t == pafs.FileType.NotFound and is_uri(normalize(loc))):
        try:
            fs.delete_dir(p)
        except (FileNotFoundError, OSError):
            if listdir(loc):
                raise


def upload_dir(local_dir: str | Path, loc, skip: tuple[str, ...] = ()) -> None:
    """Copy every file under `local_dir` to `loc` (same relative paths), except those in `skip`."""
    fs, p = filesystem(loc)
    local_dir = Path(local_dir)
    for f in sorted(local_dir.rglob("*")):
        rel = f.relative_to(local_dir).as_posix()
        if f.is_file() and rel not in skip:
            pafs.copy_files(str(f), f"{p.rstrip('/')}/{rel}", source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)


def download_dir(loc, local_dir: str | Path) -> Path:
    """Copy a directory or prefix to a local directory; returns it."""
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    fs, p = filesystem(loc)
    pafs.copy_files(p, str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


def staging_dir(loc) -> Path:
    """A local directory to build `loc` in before publish_dir: beside it when `loc` is local (so the
    final rename stays on one file system), else under the system temp directory."""
    lp = local_path(loc)
    if lp is not None:
        lp.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{lp.name}.tmp-", dir=lp.parent))
    return Path(tempfile.mkdtemp(prefix="gtc-stage-"))


def publish_dir(staged: Path, loc, commit: str) -> None:
    """Move a locally built directory to `loc`, replacing what is there, with `commit` (a file
    inside it, e.g. manifest.json) the last thing a reader can see.

    Local: two renames (the old copy is moved aside first, so a crash leaves one complete copy).
    Object store: the old commit file is deleted first (readers then see no dataset rather than
    a mix), stale objects are removed, every other file is uploaded, and the commit file last."""
    staged = Path(staged)
    lp = local_path(loc)
    try:
        if lp is not None:
            if lp.exists():
                old = lp.parent / f".{lp.name}.old-{os.getpid()}-{uuid.uuid4().hex[:4]}"
                os.rename(lp, old)
                os.rename(staged, lp)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(staged, lp)
            return
        target = join(loc, commit)
        if exists(target):
            delete(target)
        new = {f.relative_to(staged).as_posix() for f in staged.rglob("*") if f.is_file()}
        for rel in walk_files(loc):
            if rel not in new:
                delete(join(loc, rel))
        upload_dir(staged, loc, skip=(commit,))
        write_bytes(target, (staged / commit).read_bytes())
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def publish_files(staged: Path, loc, commit: str) -> None:
    """Update some files of an existing directory or prefix `loc` with a locally built `staged`
    (which holds only the changed files plus `commit`), keeping every other file at `loc`.

    The old commit file is deleted first (readers then see no commit rather than a mix), the
    changed files are uploaded over their old versions, and the commit file is written last. For
    object stores, where a directory cannot be renamed; for a local directory prefer building a
    whole copy (hard links) and `publish_dir`, which is atomic there."""
    staged = Path(staged)
    try:
        target = join(loc, commit)
        if exists(target):
            delete(target)
        upload_dir(staged, loc, skip=(commit,))
        write_bytes(target, (staged / commit).read_bytes())
    finally:
        shutil.rmtree(staged, ignore_errors=True)
