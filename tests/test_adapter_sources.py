"""Unit tests of adapters.sources: paths under roots, safe uploads, the preload folder."""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from adapters import sources
from adapters.errors import AdapterNotFound, AdapterTooLarge, InvalidAdapter
from adapters.sources import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    remove_partial_uploads,
    resolve_under_roots,
    scan_preload_dir,
    sha256_file,
    store_upload,
)

CONFIG = b'{"r": 4, "target_modules": ["q_proj"]}'
WEIGHTS = b"fake safetensors bytes" * 10
FILES = {ADAPTER_CONFIG: CONFIG, ADAPTER_WEIGHTS: WEIGHTS}
LIMIT = 10_000


# --- resolve_under_roots -----------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An adapter root holding `good/`, and an `outside/` folder next to it."""
    root = tmp_path / "roots" / "main"
    (root / "good").mkdir(parents=True)
    (root / "nested" / "deep").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    return root


def test_relative_path_is_resolved_inside_the_root(root: Path) -> None:
    assert resolve_under_roots("good", [root]) == (root / "good").resolve()
    assert resolve_under_roots("nested/deep", [root]) == (root / "nested" / "deep").resolve()
    assert resolve_under_roots("./good/", [root]) == (root / "good").resolve()


def test_absolute_path_inside_a_root_is_accepted(root: Path) -> None:
    assert resolve_under_roots(str(root / "good"), [root]) == (root / "good").resolve()


def test_roots_are_tried_in_order(tmp_path: Path, root: Path) -> None:
    second = tmp_path / "second"
    (second / "only-here").mkdir(parents=True)
    (second / "good").mkdir()
    assert resolve_under_roots("only-here", [root, second]) == (second / "only-here").resolve()
    assert resolve_under_roots("good", [root, second]) == (root / "good").resolve()


@pytest.mark.parametrize("requested", ["../outside", "good/../../outside", "a/../../x", ".."])
def test_dotdot_is_refused(root: Path, requested: str) -> None:
    with pytest.raises(InvalidAdapter, match=r"\.\."):
        resolve_under_roots(requested, [root])


def test_absolute_path_outside_is_refused_without_revealing_paths(
    tmp_path: Path, root: Path
) -> None:
    for requested in [str(tmp_path / "outside"), "/etc", "/definitely/not/there"]:
        with pytest.raises(InvalidAdapter, match="outside the allowed adapter roots") as caught:
            resolve_under_roots(requested, [root])
        assert str(root) not in caught.value.message


def test_symlink_out_of_the_root_is_refused(tmp_path: Path, root: Path) -> None:
    (root / "escape").symlink_to(tmp_path / "outside")
    (root / "dangling").symlink_to(tmp_path / "outside" / "missing")
    for requested in ["escape", "escape/", "dangling", str(root / "escape")]:
        with pytest.raises(InvalidAdapter, match="outside the allowed adapter roots") as caught:
            resolve_under_roots(requested, [root])
        assert str(tmp_path / "outside") not in caught.value.message  # the client's string only


def test_symlinked_parent_out_of_the_root_is_refused(tmp_path: Path, root: Path) -> None:
    (tmp_path / "outside" / "adapter").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    for requested in ["link/adapter", "link/missing"]:
        with pytest.raises(InvalidAdapter, match="outside"):
            resolve_under_roots(requested, [root])


def test_symlink_inside_the_roots_is_accepted(tmp_path: Path, root: Path) -> None:
    (root / "alias").symlink_to(root / "good")
    other = tmp_path / "other"
    (other / "target").mkdir(parents=True)
    (root / "to-other-root").symlink_to(other / "target")
    assert resolve_under_roots("alias", [root]) == (root / "good").resolve()
    assert resolve_under_roots("to-other-root", [root, other]) == (other / "target").resolve()


def test_root_given_through_a_symlink_works(tmp_path: Path, root: Path) -> None:
    link_root = tmp_path / "root-link"
    link_root.symlink_to(root)
    assert resolve_under_roots("good", [link_root]) == (root / "good").resolve()
    assert resolve_under_roots(str(link_root / "good"), [link_root]) == (root / "good").resolve()


def test_missing_folder_is_not_found(root: Path) -> None:
    with pytest.raises(AdapterNotFound, match="'nope'"):
        resolve_under_roots("nope", [root])
    with pytest.raises(AdapterNotFound):
        resolve_under_roots(str(root / "nope"), [root])


def test_a_file_is_not_a_folder(root: Path) -> None:
    (root / "file.txt").write_text("x")
    with pytest.raises(InvalidAdapter, match="not a folder"):
        resolve_under_roots("file.txt", [root])


@pytest.mark.parametrize("requested", ["", "good\x00", ".", "./", "x" * 5000])
def test_malformed_paths_are_refused(root: Path, requested: str) -> None:
    with pytest.raises(InvalidAdapter):
        resolve_under_roots(requested, [root])


def test_the_root_itself_is_refused(root: Path) -> None:
    with pytest.raises(InvalidAdapter):
        resolve_under_roots(str(root), [root])


def test_no_roots_means_server_paths_are_disabled(root: Path) -> None:
    with pytest.raises(InvalidAdapter, match=r"disabled.*adapter_roots"):
        resolve_under_roots(str(root / "good"), [])
    with pytest.raises(InvalidAdapter, match="disabled"):
        resolve_under_roots("good", [])


# --- uploads: helpers ---------------------------------------------------------------------------


def _tar(members: dict[str, bytes], *, gz: bool = True, folder: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as tar:
        if folder:
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, content in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}" if folder else name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _tar_with(info: tarfile.TarInfo, content: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.addfile(info, io.BytesIO(content) if content else None)
    return buffer.getvalue()


def _zip(members: dict[str, bytes], *, folder: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zipped:
        if folder:
            zipped.writestr(f"{folder}/", b"")
        for name, content in members.items():
            zipped.writestr(f"{folder}/{name}" if folder else name, content)
    return buffer.getvalue()


def _assert_stored(folder: Path, store: Path) -> None:
    assert folder.parent == store
    assert folder.name.startswith("my-adapter-")
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    assert (folder / ADAPTER_CONFIG).read_bytes() == CONFIG
    assert (folder / ADAPTER_WEIGHTS).read_bytes() == WEIGHTS
    assert [p for p in store.iterdir() if p != folder] == []  # no temporary folder left


def _assert_nothing_stored(store: Path) -> None:
    assert not store.exists() or list(store.iterdir()) == []


# --- uploads: accepted forms --------------------------------------------------------------------


def test_upload_two_files(tmp_path: Path) -> None:
    store = tmp_path / "store"
    folder = store_upload(store, "my-adapter", files=FILES, max_bytes=LIMIT)
    _assert_stored(folder, store)


def test_each_upload_gets_its_own_folder(tmp_path: Path) -> None:
    first = store_upload(tmp_path, "my-adapter", files=FILES, max_bytes=LIMIT)
    second = store_upload(tmp_path, "my-adapter", files=FILES, max_bytes=LIMIT)
    assert first != second and first.is_dir() and second.is_dir()


@pytest.mark.parametrize("gz", [True, False], ids=["tar.gz", "tar"])
@pytest.mark.parametrize("folder", ["", "my-folder", "."], ids=["top", "nested", "dot"])
def test_upload_tar(tmp_path: Path, gz: bool, folder: str) -> None:
    store = tmp_path / "store"
    archive = _tar(FILES, gz=gz, folder=folder)
    _assert_stored(store_upload(store, "my-adapter", archive=archive, max_bytes=LIMIT), store)


@pytest.mark.parametrize("folder", ["", "my-folder"], ids=["top", "nested"])
def test_upload_zip(tmp_path: Path, folder: str) -> None:
    store = tmp_path / "store"
    archive = _zip(FILES, folder=folder)
    _assert_stored(store_upload(store, "my-adapter", archive=archive, max_bytes=LIMIT), store)


# --- uploads: refused ---------------------------------------------------------------------------


def test_upload_refuses_extra_file_names(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with pytest.raises(InvalidAdapter, match="only"):
        store_upload(store, "my-adapter", files={**FILES, "run.sh": b"x"}, max_bytes=LIMIT)
    for archive in [_tar({**FILES, "README.md": b"x"}), _zip({**FILES, "README.md": b"x"})]:
        with pytest.raises(InvalidAdapter, match="not allowed"):
            store_upload(store, "my-adapter", archive=archive, max_bytes=LIMIT)
    _assert_nothing_stored(store)


def test_upload_refuses_missing_files(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with pytest.raises(InvalidAdapter, match=ADAPTER_WEIGHTS):
        store_upload(store, "my-adapter", files={ADAPTER_CONFIG: CONFIG}, max_bytes=LIMIT)
    with pytest.raises(InvalidAdapter, match=ADAPTER_CONFIG):
        store_upload(store, "my-adapter", archive=_zip({}), max_bytes=LIMIT)
    _assert_nothing_stored(store)


def test_upload_needs_exactly_one_form(tmp_path: Path) -> None:
    with pytest.raises(InvalidAdapter):
        store_upload(tmp_path, "my-adapter", max_bytes=LIMIT)
    with pytest.raises(InvalidAdapter):
        store_upload(tmp_path, "my-adapter", files=FILES, archive=_zip(FILES), max_bytes=LIMIT)


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", ""])
def test_upload_refuses_names_unfit_for_a_folder(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidAdapter):
        store_upload(tmp_path / "store", name, files=FILES, max_bytes=LIMIT)
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize(
    "member", ["../adapter_config.json", "a/../../adapter_config.json", "x/../adapter_config.json"]
)
def test_archive_refuses_dotdot_members(tmp_path: Path, member: str) -> None:
    for archive in [_tar({member: CONFIG}), _zip({member: CONFIG})]:
        with pytest.raises(InvalidAdapter, match=r"\.\."):
            store_upload(tmp_path / "store", "my-adapter", archive=archive, max_bytes=LIMIT)
    assert not (tmp_path / ADAPTER_CONFIG).exists()


def test_archive_refuses_absolute_members(tmp_path: Path) -> None:
    member = f"{tmp_path}/{ADAPTER_CONFIG}"
    for archive in [_tar({member: CONFIG}), _zip({member: CONFIG})]:
        with pytest.raises(InvalidAdapter, match="absolute"):
            store_upload(tmp_path / "store", "my-adapter", archive=archive, max_bytes=LIMIT)
    assert not (tmp_path / ADAPTER_CONFIG).exists()


def test_archive_refuses_links_and_special_files(tmp_path: Path) -> None:
    for kind in [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE]:
        info = tarfile.TarInfo(ADAPTER_CONFIG)
        info.type = kind
        info.linkname = "/etc/passwd"
        with pytest.raises(InvalidAdapter, match="link or special"):
            store_upload(tmp_path / "store", "my-adapter", archive=_tar_with(info), max_bytes=LIMIT)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        zipped.writestr(ADAPTER_WEIGHTS, WEIGHTS)
        link = zipfile.ZipInfo(ADAPTER_CONFIG)
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zipped.writestr(link, "/etc/passwd")
    with pytest.raises(InvalidAdapter, match="link or special"):
        store_upload(tmp_path / "store", "my-adapter", archive=buffer.getvalue(), max_bytes=LIMIT)
    _assert_nothing_stored(tmp_path / "store")


def test_archive_refuses_deeper_or_several_folders(tmp_path: Path) -> None:
    deep = _zip({f"a/b/{ADAPTER_CONFIG}": CONFIG})
    split = _zip({f"a/{ADAPTER_CONFIG}": CONFIG, f"b/{ADAPTER_WEIGHTS}": WEIGHTS})
    mixed = _tar({ADAPTER_CONFIG: CONFIG, f"b/{ADAPTER_WEIGHTS}": WEIGHTS})
    for archive in [deep, split, mixed]:
        with pytest.raises(InvalidAdapter, match="folder"):
            store_upload(tmp_path / "store", "my-adapter", archive=archive, max_bytes=LIMIT)


def test_archive_refuses_duplicates_and_too_many_entries(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for _ in range(2):
            info = tarfile.TarInfo(ADAPTER_CONFIG)
            info.size = len(CONFIG)
            tar.addfile(info, io.BytesIO(CONFIG))
    with pytest.raises(InvalidAdapter, match="more than once"):
        store_upload(tmp_path / "store", "my-adapter", archive=buffer.getvalue(), max_bytes=LIMIT)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for _ in range(sources.MAX_ARCHIVE_MEMBERS + 1):
            info = tarfile.TarInfo("x")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
    with pytest.raises(InvalidAdapter, match="more than"):
        store_upload(tmp_path / "store", "my-adapter", archive=buffer.getvalue(), max_bytes=LIMIT)
    _assert_nothing_stored(tmp_path / "store")


def test_upload_over_the_limit_is_too_large(tmp_path: Path) -> None:
    store = tmp_path / "store"
    limit = len(CONFIG) + len(WEIGHTS) - 1
    for upload in [{"files": FILES}, {"archive": _tar(FILES)}, {"archive": _zip(FILES)}]:
        with pytest.raises(AdapterTooLarge, match=str(limit)):
            store_upload(store, "my-adapter", max_bytes=limit, **upload)  # type: ignore[arg-type]
    _assert_nothing_stored(store)


def test_zip_that_understates_its_sizes_is_stopped_while_extracting(tmp_path: Path) -> None:
    bomb = b"\0" * 1_000_000
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr(ADAPTER_CONFIG, CONFIG)
        zipped.writestr(ADAPTER_WEIGHTS, bomb)
    data = bytearray(buffer.getvalue())
    # Rewrite the declared size in the central directory (what zipfile trusts) to 10 bytes.
    central = data.rfind(b"PK\x01\x02")
    assert data[central + 46 : central + 46 + len(ADAPTER_WEIGHTS)] == ADAPTER_WEIGHTS.encode()
    data[central + 24 : central + 28] = (10).to_bytes(4, "little")
    with pytest.raises((AdapterTooLarge, InvalidAdapter)):
        store_upload(tmp_path / "store", "my-adapter", archive=bytes(data), max_bytes=LIMIT)
    _assert_nothing_stored(tmp_path / "store")


def test_bytes_are_counted_while_writing(tmp_path: Path) -> None:
    # Declared sizes can lie; the budget counts what is actually written, chunk by chunk.
    budget = sources._Budget(10)
    with pytest.raises(AdapterTooLarge):
        sources._write_file(tmp_path, "out", iter([b"12345", b"67890", b"x"]), budget)


def test_gzip_bomb_in_a_tar_header_is_stopped(tmp_path: Path) -> None:
    # A pax header tarfile would read whole into memory: the decompressed stream is capped.
    info = tarfile.TarInfo(ADAPTER_CONFIG)
    info.pax_headers = {"comment": "x" * (LIMIT + (2 << 20))}
    info.size = len(CONFIG)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(CONFIG))
    with pytest.raises(AdapterTooLarge):
        store_upload(tmp_path / "store", "my-adapter", archive=buffer.getvalue(), max_bytes=LIMIT)


@pytest.mark.parametrize(
    "archive",
    [
        b"PK\x03\x04 not really a zip",
        b"\x1f\x8b\x08\x00 broken gzip",
        gzip.compress(b"gzip of something that is not a tar" * 20),
        b"just some bytes",
        b"",
    ],
    ids=["zip", "gzip", "gzip-not-tar", "unknown", "empty"],
)
def test_corrupt_archive_is_invalid(tmp_path: Path, archive: bytes) -> None:
    with pytest.raises(InvalidAdapter):
        store_upload(tmp_path / "store", "my-adapter", archive=archive, max_bytes=LIMIT)
    _assert_nothing_stored(tmp_path / "store")


def test_truncated_archives_are_invalid(tmp_path: Path) -> None:
    big = {ADAPTER_CONFIG: CONFIG, ADAPTER_WEIGHTS: os.urandom(5000)}
    for archive in [_tar(big), _tar(big, gz=False), _zip(big)]:
        with pytest.raises(InvalidAdapter):
            store_upload(
                tmp_path / "store",
                "my-adapter",
                archive=archive[: len(archive) // 2],
                max_bytes=LIMIT,
            )
    _assert_nothing_stored(tmp_path / "store")


def test_failure_mid_store_leaves_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail_rename(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(sources.os, "rename", fail_rename)
    with pytest.raises(OSError, match="disk gone"):
        store_upload(tmp_path / "store", "my-adapter", files=FILES, max_bytes=LIMIT)
    _assert_nothing_stored(tmp_path / "store")


def test_partial_uploads_left_by_a_crash_are_removed(tmp_path: Path) -> None:
    kept = store_upload(tmp_path, "my-adapter", files=FILES, max_bytes=LIMIT)
    (tmp_path / ".upload-my-adapter-abc.partial").mkdir()
    assert remove_partial_uploads(tmp_path) == 1
    assert list(tmp_path.iterdir()) == [kept]


# --- sha256 and preload -------------------------------------------------------------------------


def test_sha256_file_matches_hashlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_CHUNK", 7)  # many chunks
    path = tmp_path / "weights"
    data = os.urandom(1000)
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_scan_preload_dir(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name in ["zeta", "alpha", ".hidden", "no-config", "bad name"]:
        (tmp_path / name).mkdir()
        if name != "no-config":
            (tmp_path / name / ADAPTER_CONFIG).write_bytes(CONFIG)
    (tmp_path / "stray.txt").write_text("x")
    with caplog.at_level(logging.INFO, logger="adapters.sources"):
        found = scan_preload_dir(tmp_path)
    assert list(found) == ["alpha", "zeta"]
    assert found["alpha"] == tmp_path / "alpha"
    for skipped in [".hidden", "no-config", "bad name", "stray.txt"]:
        assert skipped in caplog.text


def test_scan_missing_preload_dir_is_empty(tmp_path: Path) -> None:
    assert scan_preload_dir(tmp_path / "missing") == {}
