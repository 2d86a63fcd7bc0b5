"""Reading and committing a kept layer (issue 10), on layers made by hand: no namespace, no
overlay mount. Each test builds a host directory and an upper directory the way overlayfs
(with `userxattr`) leaves one -- whiteouts as character devices 0/0, opaque directories marked
with the `user.overlay.opaque` xattr -- plus what a hostile command could leave there: symlinks
out of the tree, device nodes, setuid files, names with newlines and escape sequences.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tapbox.isolate import layerdir
from tapbox.isolate.changes import OPAQUE_XATTR, read_changes, select
from tapbox.isolate.commit import commit
from tapbox.review import counts, describe


def make_layer(tmp_path: Path) -> tuple[layerdir.LayerDir, Path, Path]:
    """A host directory with a few files, then (a moment later, so the files are older than
    the baseline) a layer over it: (layer, host, upper)."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "same.txt").write_text("unchanged\n")
    (host / "mod.txt").write_text("old\n")
    (host / "gone.txt").write_text("to be deleted\n")
    (host / "olddir").mkdir()
    (host / "olddir" / "inner").write_text("inner\n")
    (host / "keepdir").mkdir()
    (host / "keepdir" / "a").write_text("a\n")
    (host / "keepdir" / "b").write_text("b\n")
    time.sleep(0.05)
    layer = layerdir.LayerDir.create(str(tmp_path / "layer"), ["cmd"], str(host))
    number = layer.number(str(host))
    layer.prepare([number], {number: 0o755})
    return layer, host, Path(layer.upper(number))


def whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def kinds(layer: layerdir.LayerDir) -> dict[str, tuple[str, str]]:
    return {c.path: (c.kind, c.what) for c in read_changes(layer).shown}


def test_reading_a_layer_added_modified_deleted_opaque(tmp_path: Path) -> None:
    layer, host, upper = make_layer(tmp_path)
    (upper / "mod.txt").write_text("new\n")
    (upper / "same.txt").write_text("unchanged\n")  # copied up, same content: time only
    (upper / "added.txt").write_text("added\n")
    whiteout(upper / "gone.txt")
    whiteout(upper / "never-there")  # a whiteout of nothing: not shown
    (upper / "olddir").mkdir()  # removed and made again: opaque
    os.setxattr(upper / "olddir", OPAQUE_XATTR, b"y")
    (upper / "olddir" / "fresh").write_text("fresh\n")
    (upper / "keepdir").mkdir()  # copied up on the way to a change: not shown itself
    (upper / "keepdir" / "b").write_text("b2\n")
    (upper / "newdir").mkdir()
    (upper / "newdir" / "f").write_text("f\n")
    found = kinds(layer)
    h = str(host)
    assert found == {
        f"{h}/mod.txt": ("modified", "file"), f"{h}/same.txt": ("modified", "file"),
        f"{h}/added.txt": ("added", "file"), f"{h}/gone.txt": ("deleted", "file"),
        f"{h}/olddir/inner": ("deleted", "file"), f"{h}/olddir/fresh": ("added", "file"),
        f"{h}/keepdir/b": ("modified", "file"), f"{h}/newdir": ("added", "dir"),
        f"{h}/newdir/f": ("added", "file"),
    }
    details = {c.path: c.detail for c in read_changes(layer).shown}
    assert details[f"{h}/same.txt"] == "time" and details[f"{h}/mod.txt"] == "content"
    changes = read_changes(layer)
    assert (changes.count("added"), changes.count("modified"), changes.count("deleted")) == \
        (4, 3, 2)
    assert [c.path for c in select(changes.shown, [f"{h}/olddir"])] == \
        [f"{h}/olddir/inner", f"{h}/olddir/fresh"]


def test_commit_everything_then_again(tmp_path: Path) -> None:
    layer, host, upper = make_layer(tmp_path)
    (upper / "mod.txt").write_text("new\n")
    os.chmod(upper / "mod.txt", 0o640)
    os.utime(upper / "mod.txt", ns=(1_000_000_000, 1_000_000_000))
    (upper / "added.txt").write_text("added\n")
    whiteout(upper / "gone.txt")
    (upper / "olddir").mkdir()
    os.setxattr(upper / "olddir", OPAQUE_XATTR, b"y")
    (upper / "olddir" / "fresh").write_text("fresh\n")
    (upper / "newdir").mkdir(mode=0o750)
    os.chmod(upper / "newdir", 0o750)
    (upper / "newdir" / "f").write_text("f\n")
    os.symlink("../../../etc/passwd", upper / "link")
    os.mkfifo(upper / "fifo")
    result = commit(layer, read_changes(layer).items)
    assert result.ok, result.lines()
    assert (host / "mod.txt").read_text() == "new\n"
    assert stat.S_IMODE((host / "mod.txt").stat().st_mode) == 0o640
    assert (host / "mod.txt").stat().st_mtime_ns == 1_000_000_000
    assert (host / "added.txt").read_text() == "added\n"
    assert not (host / "gone.txt").exists()
    assert sorted(os.listdir(host / "olddir")) == ["fresh"]
    assert stat.S_IMODE((host / "newdir").stat().st_mode) == 0o750
    assert (host / "newdir" / "f").read_text() == "f\n"
    assert os.readlink(host / "link") == "../../../etc/passwd"  # as a symlink, as it was
    assert stat.S_ISFIFO(os.lstat(host / "fifo").st_mode)
    assert not [n for n in os.listdir(host) if n.startswith(".tapbox-commit-")]
    # Everything committed left the layer; committing again changes nothing.
    assert os.listdir(upper) == []
    before = {p: p.read_bytes() for p in host.rglob("*") if p.is_file() and not p.is_symlink()
              and not stat.S_ISFIFO(p.lstat().st_mode)}
    again = commit(layer, read_changes(layer).items)
    assert again.ok and not again.committed
    assert before == {p: p.read_bytes() for p in before}


def test_partial_commit_leaves_the_rest(tmp_path: Path) -> None:
    layer, host, upper = make_layer(tmp_path)
    (upper / "mod.txt").write_text("new\n")
    (upper / "added.txt").write_text("added\n")
    (upper / "newdir").mkdir()
    (upper / "newdir" / "one").write_text("1\n")
    (upper / "newdir" / "two").write_text("2\n")
    items = list(select(read_changes(layer).items, [f"{host}/newdir/one"]))
    assert commit(layer, items).ok
    assert (host / "newdir" / "one").read_text() == "1\n"
    assert not (host / "newdir" / "two").exists()
    assert (host / "mod.txt").read_text() == "old\n" and not (host / "added.txt").exists()
    assert set(kinds(layer)) == {f"{host}/mod.txt", f"{host}/added.txt",
                                 f"{host}/newdir/two"}


def test_conflicts_are_not_overwritten_unless_forced(tmp_path: Path) -> None:
    layer, host, upper = make_layer(tmp_path)
    (upper / "mod.txt").write_text("from the sandbox\n")
    whiteout(upper / "gone.txt")
    whiteout(upper / "olddir")
    (host / "mod.txt").write_text("edited on the host meanwhile\n")
    (host / "gone.txt").chmod(0o600)  # a change of metadata counts too
    (host / "olddir" / "inner").write_text("edited too\n")  # inside a directory to delete
    result = commit(layer, read_changes(layer).items)
    assert {c.path for c, _why in result.conflicts} == \
        {f"{host}/mod.txt", f"{host}/gone.txt", f"{host}/olddir"}
    assert any("olddir/inner in it changed" in why for _c, why in result.conflicts)
    assert (host / "mod.txt").read_text() == "edited on the host meanwhile\n"
    assert (host / "gone.txt").exists() and (host / "olddir" / "inner").exists()
    assert len(read_changes(layer).shown) == 3  # still in the layer
    forced = commit(layer, read_changes(layer).items, force=True)
    assert forced.ok, forced.lines()
    assert (host / "mod.txt").read_text() == "from the sandbox\n"
    assert not (host / "gone.txt").exists() and not (host / "olddir").exists()


def test_a_symlink_on_the_host_path_is_never_followed(tmp_path: Path) -> None:
    """The layer has newdir/f and sub/x; by commit time the host's sub is a symlink to a
    directory outside: nothing is written there. A symlink planted in the layer where the host
    has a directory replaces the directory, and nothing is written through it."""
    layer, host, upper = make_layer(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (host / "sub").mkdir()
    (upper / "sub").mkdir()
    (upper / "sub" / "x").write_text("through the link?\n")
    (host / "sub").rmdir()
    os.symlink(outside, host / "sub")
    os.symlink(str(outside), upper / "keepdir")  # a dir of the host replaced by a symlink
    result = commit(layer, read_changes(layer).items)
    assert {c.path for c, _why in result.conflicts} == {f"{host}/sub", f"{host}/sub/x"}, \
        result.lines()
    assert any("now a symlink" in why for _c, why in result.conflicts)
    assert os.listdir(outside) == []
    assert os.readlink(host / "keepdir") == str(outside)  # the symlink itself, not followed
    # Forced, the layer's directory replaces the host's symlink: still nothing outside.
    assert commit(layer, read_changes(layer).items, force=True).ok
    assert os.listdir(outside) == []
    assert not (host / "sub").is_symlink() and (host / "sub" / "x").exists()


def test_a_host_directory_replaced_by_a_symlink_above_the_layer_root(tmp_path: Path) -> None:
    """The layer's host directory itself now leads through a symlink: a conflict."""
    layer, host, upper = make_layer(tmp_path)
    (upper / "added.txt").write_text("x\n")
    moved = tmp_path / "moved"
    host.rename(moved)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, host)
    result = commit(layer, read_changes(layer).items, force=True)
    assert not result.committed
    assert os.listdir(outside) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="making a real device node needs root")
def test_devices_and_setuid_files_are_refused(tmp_path: Path) -> None:
    layer, host, upper = make_layer(tmp_path)
    os.mknod(upper / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (upper / "suid").write_text("#!/bin/sh\n")
    os.chmod(upper / "suid", 0o4755)
    (upper / "sgid").write_text("x\n")
    os.chmod(upper / "sgid", 0o2755)
    (upper / "plain").write_text("x\n")
    result = commit(layer, read_changes(layer).items)
    refused = {c.path: why for c, why in result.refused}
    assert set(refused) == {f"{host}/null", f"{host}/suid", f"{host}/sgid"}
    assert "device node" in refused[f"{host}/null"] and "setuid" in refused[f"{host}/suid"]
    assert not (host / "null").exists() and not (host / "suid").exists()
    assert (host / "plain").exists()
    assert set(kinds(layer)) == set(refused)  # refused changes stay in the layer


def test_hostile_names_are_escaped_and_committed_as_they_are(tmp_path: Path) -> None:
    layer, host, upper = make_layer(tmp_path)
    name = b"evil\nD file    etc-passwd\x1b[2J\xff"
    (upper / os.fsdecode(name)).write_bytes(b"x\n")
    lines = [describe(c) for c in read_changes(layer).shown]
    assert len(lines) == 1 and "\n" not in lines[0] and "\x1b" not in lines[0]
    assert "\\x0a" in lines[0] and "\\x1b" in lines[0]
    assert commit(layer, read_changes(layer).items).ok
    assert (host / os.fsdecode(name)).read_bytes() == b"x\n"


def test_a_large_file_and_hard_links(tmp_path: Path) -> None:
    layer, host, upper = make_layer(tmp_path)
    data = os.urandom(1 << 20) * 24  # 24 MiB
    (upper / "big").write_bytes(data)
    os.link(upper / "big", upper / "big-link")
    assert commit(layer, read_changes(layer).items).ok
    assert (host / "big").read_bytes() == data and (host / "big-link").read_bytes() == data
    assert (host / "big").stat().st_ino == (host / "big-link").stat().st_ino  # still linked


def test_a_layer_deeper_than_the_limit_is_reported_not_walked_forever(tmp_path: Path) -> None:
    from tapbox.isolate import changes as changes_mod

    layer, host, upper = make_layer(tmp_path)
    fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(changes_mod.MAX_DEPTH + 5):
        os.mkdir("d", dir_fd=fd)
        new = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = new
    os.close(fd)
    found = read_changes(layer)
    assert "deeper than" in found.incomplete


def test_a_file_copied_up_unchanged_is_not_shown_and_not_written(tmp_path: Path) -> None:
    """A file opened for writing and left as it was (a lock file) is copied up by overlayfs:
    not a change to show, and a commit only takes it out of the layer."""
    layer, host, upper = make_layer(tmp_path)
    st = (host / "same.txt").stat()
    (upper / "same.txt").write_text("unchanged\n")
    os.utime(upper / "same.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    (upper / "added.txt").write_text("x\n")
    assert set(kinds(layer)) == {f"{host}/added.txt"}
    assert counts(read_changes(layer)) == "1 added, 2 bytes"  # the unchanged copy not counted
    ino = (host / "same.txt").stat().st_ino
    assert commit(layer, read_changes(layer).items).ok
    assert (host / "same.txt").stat().st_ino == ino  # not rewritten
    assert os.listdir(upper) == []


def few_descriptors(limit: int = 256) -> Iterator[None]:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_discarding_a_very_deep_layer(tmp_path: Path) -> None:
    """Deeper than Python's recursion limit and the descriptor limit: removed all the same."""
    layer, _host, upper = make_layer(tmp_path)
    fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1200):
        os.mkdir("d", dir_fd=fd)
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
        new = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = new
    os.chmod(".", 0, dir_fd=fd)  # as overlayfs leaves its work directory
    os.close(fd)
    try:
        with contextlib.contextmanager(few_descriptors)():
            layer.remove()
        assert not Path(layer.path).exists()
    finally:  # pytest's own clean-up recurses: never leave it a tree this deep
        subprocess.run(["chmod", "-R", "u+rwx", str(tmp_path)], capture_output=True)
        subprocess.run(["rm", "-rf", str(tmp_path / "layer")], capture_output=True)


def test_a_wide_host_directory_to_delete_is_checked_with_few_descriptors(tmp_path: Path) -> None:
    host = tmp_path / "host"
    wide = host / "olddir"
    wide.mkdir(parents=True)
    for i in range(400):
        (wide / f"d{i}").mkdir()
    time.sleep(0.05)
    layer = layerdir.LayerDir.create(str(tmp_path / "layer"), ["cmd"], str(host))
    number = layer.number(str(host))
    layer.prepare([number], {number: 0o755})
    whiteout(Path(layer.upper(number)) / "olddir")
    with contextlib.contextmanager(few_descriptors)():
        result = commit(layer, read_changes(layer).items)
    assert result.ok, result.lines()
    assert not wide.exists()
