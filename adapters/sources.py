"""Where adapter folders come from: server paths under allowed roots, uploads, a preload folder.

Nothing here checks what the adapter files hold (another module validates them); this module
only makes sure that a folder is where it may be, and that an upload lands safely on disk.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import shutil
import stat
import tarfile
import tempfile
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

from adapters.durable import fsync_dir
from adapters.errors import AdapterNotFound, AdapterTooLarge, InvalidAdapter
from adapters.registry import check_name

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = frozenset({ADAPTER_CONFIG, ADAPTER_WEIGHTS})

MAX_ARCHIVE_MEMBERS = 16  # two files and a folder are all a valid archive needs
MAX_PATH_LENGTH = 4096
_CHUNK = 1 << 20
_SHOWN_CHARS = 200
# Tar headers, padding and end blocks on top of the file contents a valid archive may hold.
_TAR_OVERHEAD = 1 << 20
_PARTIAL_PREFIX = ".upload-"
_PARTIAL_SUFFIX = ".partial"
# What a damaged archive raises from tarfile, zipfile, gzip and zlib while being read.
_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError)


def _shown(requested: str) -> str:
    """The client's own string, capped, for a message (never a path the server resolved)."""
    return requested if len(requested) <= _SHOWN_CHARS else requested[:_SHOWN_CHARS] + "..."


# --- server paths under configured roots -------------------------------------------------------


def _strictly_inside(path: Path, roots: list[Path]) -> bool:
    return any(path != root and path.is_relative_to(root) for root in roots)


def resolve_under_roots(requested: str, roots: list[Path]) -> Path:
    """The real folder that `requested` names inside one of `roots`, symlinks followed.

    `requested` is relative to a root (roots tried in order; the first where it exists wins)
    or absolute and inside a root. InvalidAdapter for empty, NUL, `..`, paths or symlinks that
    lead outside every root, and non-folders; AdapterNotFound if nothing is there.
    """
    if not roots:
        raise InvalidAdapter(
            "loading adapters from server paths is disabled; set `adapter_roots` in the server "
            "settings to enable it, or upload the adapter instead"
        )
    if not requested:
        raise InvalidAdapter("adapter path must not be empty")
    if "\x00" in requested:
        raise InvalidAdapter("adapter path must not contain NUL bytes")
    if len(requested) > MAX_PATH_LENGTH:
        raise InvalidAdapter(f"adapter path must be at most {MAX_PATH_LENGTH} characters")
    shown = _shown(requested)
    parts = PurePosixPath(requested).parts
    if ".." in parts:
        raise InvalidAdapter(f"adapter path {shown!r} must not contain '..'")
    outside = InvalidAdapter(f"adapter path {shown!r} is outside the allowed adapter roots")
    real_roots = [Path(os.path.realpath(root)) for root in roots]

    if os.path.isabs(requested):
        # Judge the path as written first, so its existence outside the roots is never revealed.
        written = Path(os.path.normpath(requested))
        if not _strictly_inside(written, [Path(os.path.abspath(r)) for r in roots] + real_roots):
            raise outside
        candidates = [written]
    else:
        if not parts:  # "." or "./" would name the root itself
            raise InvalidAdapter("adapter path must name a folder inside an adapter root")
        candidates = [Path(os.path.abspath(root)) / requested for root in roots]

    for candidate in candidates:
        real = Path(os.path.realpath(candidate))
        # Only a symlink can lead out (`..` is refused), and it does so in any root it is found.
        if not _strictly_inside(real, real_roots):
            raise outside
        if os.path.exists(real):
            if not os.path.isdir(real):
                raise InvalidAdapter(f"adapter path {shown!r} is not a folder")
            logger.debug("adapter path %r resolved to %s", shown, real)
            return real
    raise AdapterNotFound(f"no adapter folder at {shown!r} in the allowed adapter roots")


# --- uploads ------------------------------------------------------------------------------------


class _Budget:
    """Bytes an upload may still write; AdapterTooLarge once it is spent."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.left = max_bytes

    def spend(self, count: int) -> None:
        self.left -= count
        if self.left < 0:
            raise AdapterTooLarge(f"adapter is larger than the limit of {self.max_bytes} bytes")


class _BoundedReader(io.RawIOBase):
    """A stream that refuses to yield more than `limit` bytes: defeats gzip bombs in tar headers."""

    def __init__(self, source: io.BufferedIOBase, limit: int, max_bytes: int) -> None:
        self._source = source
        self._left = limit
        self._max_bytes = max_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._source.read(len(buffer))
        self._left -= len(data)
        if self._left < 0:
            raise AdapterTooLarge(f"adapter is larger than the limit of {self._max_bytes} bytes")
        buffer[: len(data)] = data
        return len(data)


def _archive_file_name(member: str, is_dir: bool) -> tuple[str, str] | None:
    """(top folder or "", file name) for a member; None for the archive's own root (`./`)."""
    if member.startswith(("/", "\\")) or (len(member) > 1 and member[1] == ":"):
        raise InvalidAdapter(f"archive member {_shown(member)!r} has an absolute name")
    if "\\" in member or "\x00" in member:
        raise InvalidAdapter(f"archive member {_shown(member)!r} has a forbidden character")
    parts = PurePosixPath(member).parts
    if ".." in parts:
        raise InvalidAdapter(f"archive member {_shown(member)!r} must not contain '..'")
    if is_dir:
        if len(parts) > 1:
            raise InvalidAdapter("archive may hold at most one folder, at its top level")
        return None if not parts else (parts[0], "")
    if len(parts) == 1:
        folder, file_name = "", parts[0]
    elif len(parts) == 2:
        folder, file_name = parts
    else:
        raise InvalidAdapter("archive may hold at most one folder, at its top level")
    if file_name not in ADAPTER_FILES:
        raise InvalidAdapter(
            f"archive member {_shown(member)!r} is not allowed; an adapter archive holds only "
            f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
        )
    return folder, file_name


class _Layout:
    """Checks that all members share one top folder (or none) and no file appears twice."""

    def __init__(self) -> None:
        self.folder: str | None = None
        self.seen: set[str] = set()
        self.count = 0

    def admit(self, member: str, is_dir: bool) -> str | None:
        """The file name to write for `member`, or None for a folder entry."""
        self.count += 1
        if self.count > MAX_ARCHIVE_MEMBERS:
            raise InvalidAdapter(f"archive holds more than {MAX_ARCHIVE_MEMBERS} entries")
        placed = _archive_file_name(member, is_dir)
        if placed is None:
            return None
        folder, file_name = placed
        if self.folder is None:
            self.folder = folder
        elif folder != self.folder:
            raise InvalidAdapter("archive files must sit at its top level or in one folder")
        if not file_name:
            return None
        if file_name in self.seen:
            raise InvalidAdapter(f"archive holds {file_name} more than once")
        self.seen.add(file_name)
        return file_name


def _read_chunks(source: IO[bytes]) -> Iterator[bytes]:
    """Chunks of an archive member; a read error means the archive is damaged."""
    while True:
        try:
            chunk = source.read(_CHUNK)
        except _CORRUPT as exc:
            raise InvalidAdapter("archive is corrupt or truncated") from exc
        if not chunk:
            return
        yield chunk


def _write_file(folder: Path, name: str, chunks: Iterator[bytes], budget: _Budget) -> None:
    with open(folder / name, "xb") as out:
        for chunk in chunks:
            budget.spend(len(chunk))
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


def _open_tar_stream(stream: IO[bytes]) -> tarfile.TarFile:
    try:
        # Stream mode: members are read in order, never by seeking back over decompressed data.
        return tarfile.open(fileobj=stream, mode="r|")
    except _CORRUPT as exc:
        raise InvalidAdapter("archive is corrupt or not a tar archive") from exc


def _extract_tar(archive: bytes, folder: Path, budget: _Budget, gzipped: bool) -> None:
    source: io.BufferedIOBase = io.BytesIO(archive)
    if gzipped:
        source = gzip.GzipFile(fileobj=source, mode="rb")
    bounded = io.BufferedReader(
        _BoundedReader(source, budget.max_bytes + _TAR_OVERHEAD, budget.max_bytes)
    )
    layout = _Layout()
    declared = 0
    with _open_tar_stream(bounded) as tar:
        members = iter(tar)
        while True:
            try:
                member = next(members)
            except StopIteration:
                break
            except _CORRUPT as exc:
                raise InvalidAdapter("archive is corrupt or truncated") from exc
            if not (member.isreg() or member.isdir()):
                raise InvalidAdapter(
                    f"archive member {_shown(member.name)!r} is a link or special file; "
                    "only regular files are allowed"
                )
            file_name = layout.admit(member.name, member.isdir())
            if file_name is None:
                continue
            declared += member.size
            if declared > budget.max_bytes:
                raise AdapterTooLarge(
                    f"adapter is larger than the limit of {budget.max_bytes} bytes"
                )
            try:
                extracted = tar.extractfile(member)
            except _CORRUPT as exc:
                raise InvalidAdapter("archive is corrupt or truncated") from exc
            if extracted is None:  # pragma: no cover - isreg() members always have data
                raise InvalidAdapter(f"archive member {_shown(member.name)!r} has no data")
            _write_file(folder, file_name, _read_chunks(extracted), budget)


def _zip_member_is_regular(info: zipfile.ZipInfo) -> bool:
    # Archives made off Unix carry no file type; only a Unix mode can say "symlink".
    file_type = stat.S_IFMT(info.external_attr >> 16)
    return file_type in (0, stat.S_IFREG) or (info.is_dir() and file_type == stat.S_IFDIR)


def _extract_zip(archive: bytes, folder: Path, budget: _Budget) -> None:
    try:
        zipped = zipfile.ZipFile(io.BytesIO(archive))
    except _CORRUPT as exc:
        raise InvalidAdapter("archive is corrupt or not a zip archive") from exc
    with zipped:
        infos = zipped.infolist()
        if len(infos) > MAX_ARCHIVE_MEMBERS:
            raise InvalidAdapter(f"archive holds more than {MAX_ARCHIVE_MEMBERS} entries")
        layout = _Layout()
        admitted: list[tuple[zipfile.ZipInfo, str]] = []
        for info in infos:
            if not _zip_member_is_regular(info):
                raise InvalidAdapter(
                    f"archive member {_shown(info.filename)!r} is a link or special file; "
                    "only regular files are allowed"
                )
            if info.flag_bits & 0x1:
                raise InvalidAdapter("encrypted zip archives are not supported")
            file_name = layout.admit(info.filename, info.is_dir())
            if file_name is not None:
                admitted.append((info, file_name))
        # Declared sizes first (cheap), then actual bytes while writing (they may lie).
        if sum(info.file_size for info, _ in admitted) > budget.max_bytes:
            raise AdapterTooLarge(f"adapter is larger than the limit of {budget.max_bytes} bytes")
        for info, file_name in admitted:
            try:
                member = zipped.open(info)
            except _CORRUPT as exc:
                raise InvalidAdapter("archive is corrupt or truncated") from exc
            with member:
                _write_file(folder, file_name, _read_chunks(member), budget)


def _extract_archive(archive: bytes, folder: Path, budget: _Budget) -> None:
    """Unpack the adapter files of a .tar.gz, .tar or .zip (known by magic bytes) into `folder`."""
    if archive[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        _extract_zip(archive, folder, budget)
    elif archive[:2] == b"\x1f\x8b":
        _extract_tar(archive, folder, budget, gzipped=True)
    elif archive[257:262] == b"ustar":
        _extract_tar(archive, folder, budget, gzipped=False)
    else:
        raise InvalidAdapter("archive must be a .tar.gz, .tar or .zip file")


def _write_files(files: dict[str, bytes], folder: Path, budget: _Budget) -> None:
    extra = sorted(set(files) - ADAPTER_FILES)
    if extra:
        raise InvalidAdapter(
            f"unexpected file {_shown(extra[0])!r}; an adapter upload holds only "
            f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
        )
    if sum(len(content) for content in files.values()) > budget.max_bytes:
        raise AdapterTooLarge(f"adapter is larger than the limit of {budget.max_bytes} bytes")
    for name, content in files.items():
        _write_file(folder, name, iter([content]), budget)


def store_upload(
    store_dir: Path,
    name: str,
    files: dict[str, bytes] | None = None,
    archive: bytes | None = None,
    *,
    max_bytes: int,
) -> Path:
    """Write an uploaded adapter into a new folder `<store_dir>/<name>-<random hex>`; return it.

    Give either `files` ({adapter_config.json, adapter_model.safetensors} -> bytes) or
    `archive` (.tar.gz, .tar or .zip holding those two files at its top level or in one
    folder). The files are written to a hidden temporary sibling and renamed into place, so
    the folder appears complete or not at all. InvalidAdapter for anything else in the upload
    or a damaged archive; AdapterTooLarge past `max_bytes` of file contents.
    """
    check_name(name, base_model_name="")  # only the format matters: it becomes a folder name
    if (files is None) == (archive is None):
        raise InvalidAdapter("upload either the adapter files or one archive of them")
    store_dir.mkdir(parents=True, exist_ok=True)
    budget = _Budget(max_bytes)
    partial = Path(
        tempfile.mkdtemp(prefix=f"{_PARTIAL_PREFIX}{name}-", suffix=_PARTIAL_SUFFIX, dir=store_dir)
    )
    try:
        if files is not None:
            _write_files(files, partial, budget)
        elif archive is not None:
            _extract_archive(archive, partial, budget)
        missing = sorted(ADAPTER_FILES - {p.name for p in partial.iterdir()})
        if missing:
            raise InvalidAdapter(f"upload is missing {' and '.join(missing)}")
        final = store_dir / f"{name}-{uuid.uuid4().hex[:16]}"
        os.rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    fsync_dir(store_dir)  # makes the rename durable; the folder is complete either way
    logger.info("stored uploaded adapter %s in %s", name, final)
    return final


def remove_partial_uploads(store_dir: Path) -> int:
    """Delete temporary upload folders a crash left behind (call at start-up); how many."""
    if not store_dir.is_dir():
        return 0
    removed = 0
    for entry in store_dir.iterdir():
        if entry.name.startswith(_PARTIAL_PREFIX) and entry.name.endswith(_PARTIAL_SUFFIX):
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
            logger.warning("removed an unfinished upload left behind: %s", entry)
    return removed


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks so large weights never sit in memory whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- preload folder -----------------------------------------------------------------------------


def scan_preload_dir(preload_dir: Path) -> dict[str, Path]:
    """Adapters to load at start-up: each sub-folder with an adapter_config.json, by folder name.

    Like NVIDIA NIM's LoRA folder. Sorted by name; hidden entries, files, folders without an
    adapter_config.json and folder names that are not valid adapter names are skipped and logged.
    """
    if not preload_dir.is_dir():
        logger.warning("adapter preload folder %s does not exist; preloading nothing", preload_dir)
        return {}
    found: dict[str, Path] = {}
    for entry in sorted(preload_dir.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            logger.info("preload: skipping hidden entry %s", entry.name)
        elif not entry.is_dir():
            logger.info("preload: skipping %s, not a folder", entry.name)
        elif not (entry / ADAPTER_CONFIG).is_file():
            logger.warning("preload: skipping %s, it has no %s", entry.name, ADAPTER_CONFIG)
        else:
            try:
                check_name(entry.name, base_model_name="")
            except InvalidAdapter as exc:
                logger.warning("preload: skipping %s: %s", entry.name, exc.message)
                continue
            found[entry.name] = entry
    return found
