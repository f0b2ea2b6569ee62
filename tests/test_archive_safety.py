"""Untrusted working_dir archives: each attack is tried on a real zip and refused.

A working_dir package comes out of Redis, so a node unpacks it as untrusted input:
nothing may land outside its directory, no link is written, no setuid bit survives,
and a zip bomb stops at the limit.
"""

from __future__ import annotations

import hashlib
import io
import stat
import zipfile
from pathlib import Path

import pytest

from taskserve.node.envs import UnsafeArchive, extract_safely, unpack_working_dir
from taskserve.runtime_env import pack_working_dir


def make_zip(*entries: tuple[str, bytes, int]) -> bytes:
    """A zip of ``(name, content, unix mode)`` entries, written as an attacker would."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content, mode in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, content)
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["../outside.txt", "../../outside.txt", "sub/../../outside.txt",
                                  "/tmp/taskserve-absolute.txt", "C:/windows.txt", "..\\outside.txt"])
def test_entries_outside_the_directory_are_refused_and_nothing_outside_changes(tmp_path, name):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    outside.chmod(0o600)
    blob = make_zip(("fine.txt", b"x", 0o100644), (name, b"owned", 0o100777))
    with pytest.raises(UnsafeArchive, match="outside its directory"):
        extract_safely(blob, tmp_path / "work" / "dir")
    assert outside.read_text() == "keep" and stat.S_IMODE(outside.stat().st_mode) == 0o600
    assert not Path("/tmp/taskserve-absolute.txt").exists()


def test_symbolic_links_are_refused(tmp_path):
    blob = make_zip(("link", b"/etc/passwd", stat.S_IFLNK | 0o777))
    with pytest.raises(UnsafeArchive, match="symbolic link"):
        extract_safely(blob, tmp_path / "dir")


def test_devices_and_fifos_are_refused(tmp_path):
    blob = make_zip(("fifo", b"", stat.S_IFIFO | 0o644))
    with pytest.raises(UnsafeArchive, match="not a plain file"):
        extract_safely(blob, tmp_path / "dir")


def test_setuid_setgid_and_sticky_bits_are_never_restored(tmp_path):
    blob = make_zip(("tool", b"#!/bin/sh\n", 0o106755), ("shared", b"", 0o101777), ("plain", b"", 0o100640))
    extract_safely(blob, tmp_path / "dir")
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "dir").iterdir()}
    assert modes == {"tool": 0o755, "shared": 0o777, "plain": 0o640}


def test_a_zip_bomb_stops_at_the_size_limit(tmp_path):
    bomb = make_zip(("zeros", b"\0" * (4 * 2**20), 0o100644))
    assert len(bomb) < 64 * 2**10       # small in Redis, big on disk
    with pytest.raises(UnsafeArchive, match="zip bomb"):
        extract_safely(bomb, tmp_path / "dir", max_bytes=2**20)


def test_a_size_the_archive_lies_about_is_counted_as_written(tmp_path):
    blob = bytearray(make_zip(("zeros", b"\0" * (3 * 2**20), 0o100644)))
    # Make both headers claim 10 bytes: the bound must hold on what is actually unpacked.
    for header, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = blob.find(header)
        blob[at + offset:at + offset + 4] = (10).to_bytes(4, "little")
    with pytest.raises((UnsafeArchive, zipfile.BadZipFile)):
        extract_safely(bytes(blob), tmp_path / "dir", max_bytes=2**20)
    written = sum(p.stat().st_size for p in (tmp_path / "dir").rglob("*") if p.is_file()) \
        if (tmp_path / "dir").exists() else 0
    assert written <= 2**20 + 2**20     # at most one chunk past the limit


def test_too_many_files_are_refused(tmp_path):
    blob = make_zip(*[(f"f{i}", b"", 0o100644) for i in range(20)])
    with pytest.raises(UnsafeArchive, match="20 entries"):
        extract_safely(blob, tmp_path / "dir", max_files=10)


def test_a_refused_package_leaves_no_directory_behind_and_is_not_marked_done(tmp_path):
    blob = make_zip(("ok.py", b"x = 1\n", 0o100644), ("../escape.py", b"", 0o100644))
    sha = hashlib.sha256(blob).hexdigest()
    with pytest.raises(UnsafeArchive):
        unpack_working_dir(tmp_path / "wd", sha, lambda: blob)
    assert not (tmp_path / "wd" / sha).exists() and not (tmp_path / "wd" / f"{sha}.unpacked").exists()
    assert not (tmp_path / "escape.py").exists()


def test_what_taskserve_packs_unpacks_with_its_modes(tmp_path):
    source = tmp_path / "src"
    (source / "pkg").mkdir(parents=True)
    (source / "pkg" / "mod.py").write_text("VALUE = 3\n")
    (source / "run.sh").write_text("#!/bin/sh\n")
    (source / "run.sh").chmod(0o755)
    sha, blob = pack_working_dir(source)
    target = unpack_working_dir(tmp_path / "wd", sha, lambda: blob)
    assert (target / "pkg" / "mod.py").read_text() == "VALUE = 3\n"
    assert stat.S_IMODE((target / "run.sh").stat().st_mode) == 0o755


def test_the_packer_refuses_a_link_out_of_the_working_dir_and_ships_nothing_it_points_to(tmp_path):
    secret = tmp_path / "home" / ".ssh" / "id_rsa"
    secret.parent.mkdir(parents=True)
    secret.write_text("PRIVATE KEY of the deployer")
    work = tmp_path / "work"
    (work / "pkg").mkdir(parents=True)
    (work / "pkg" / "model.py").write_text("VALUE = 1\n")
    (work / "pkg" / "same.py").symlink_to("model.py")                 # inside: packed as that file
    assert "pkg/same.py" in zipfile.ZipFile(io.BytesIO(pack_working_dir(work)[1])).namelist()
    for link, target in (("pkg/key.txt", secret), ("outside", secret.parent), ("up.py", "../home/.ssh/id_rsa")):
        (work / link).symlink_to(target)
        with pytest.raises(ValueError, match=f"symbolic link '{link}' to .*outside the directory: refused"):
            pack_working_dir(work)
        (work / link).unlink()
    (work / ".gitignore").write_text("key.txt\n")                      # a link the user leaves out is no problem
    (work / "pkg" / "key.txt").symlink_to(secret)
    _, blob = pack_working_dir(work)
    assert b"PRIVATE KEY" not in zipfile.ZipFile(io.BytesIO(blob)).read("pkg/model.py") + blob
    assert "pkg/key.txt" not in zipfile.ZipFile(io.BytesIO(blob)).namelist()
