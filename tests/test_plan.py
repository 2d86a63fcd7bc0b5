"""The sandbox's filesystem plan is data: built, compared and printed without any namespace.

Also without namespaces: the command's environment (tapbox.isolate.environment) and the count
of what was discarded from a copy-on-write home (tapbox.isolate.discarded), on a directory laid
out as overlayfs leaves its upper layer.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from test_layering import imported_names

from tapbox.errors import SetupError
from tapbox.isolate import SandboxConfig, discarded, rootfs
from tapbox.isolate import plan as plan_mod
from tapbox.isolate.environment import command_environment
from tapbox.isolate.plan import (
    Bind,
    BindFile,
    Device,
    FreshProc,
    FreshSysfs,
    Hide,
    HomeOverlay,
    NewRoot,
    Op,
    Pin,
    PivotRoot,
    ReadOnly,
    ReadOnlyFile,
    Symlink,
    Tmpfs,
)
from tapbox.isolate.rootfs import Entry, HostFacts
from tapbox.options import FilesystemOptions, PathRule

ISOLATE = Path(__file__).resolve().parent.parent / "tapbox" / "isolate"
HOST = FilesystemOptions(view="host")
RESOLV = os.path.realpath("/etc/resolv.conf")


# ------------------------------------------------------------------------------------------------
# The host view (--fs host)


def test_network_plan_binds_a_private_resolv_conf_after_sysfs() -> None:
    plan = plan_mod.build(SandboxConfig(["true"], filesystem=HOST), "/tmp/tapbox-resolv-x")
    assert plan.ops == (
        FreshSysfs("/sys"),
        BindFile("/tmp/tapbox-resolv-x", RESOLV, "a private resolv.conf", "run tapbox -n"),
        FreshProc("/proc"),
    )
    assert plan.describe() == [
        "sysfs /sys (best effort; submounts carried over)",
        f"bind /tmp/tapbox-resolv-x -> {RESOLV} (a private resolv.conf)",
        "proc /proc (the sandbox's PID namespace)",
    ]


def test_no_network_plan_keeps_the_hosts_resolv_conf() -> None:
    plan = plan_mod.build(SandboxConfig(["true"], network=False, filesystem=HOST), None)
    assert plan.ops == (FreshSysfs("/sys"), FreshProc("/proc"))


def _fake_stat(kinds: dict[str, int]) -> Callable[[str], os.stat_result]:
    def stat_path(path: str) -> os.stat_result:
        if path not in kinds:
            raise FileNotFoundError(2, "No such file or directory")
        return os.stat_result((kinds[path], len(path), 7, 1, 0, 0, 0, 0, 0, 0))
    return stat_path


def test_record_files_are_read_only_and_their_directories_pinned_deepest_first() -> None:
    files = ("/work/p/logs/run.jsonl", "/work/p/run.pcap", "/work/p/run.pcap", "/dev/null")
    config = SandboxConfig(["true"], network=False, read_only_files=files, filesystem=HOST)
    kinds = {"/work/p/logs/run.jsonl": stat.S_IFREG | 0o644, "/work/p/run.pcap": stat.S_IFREG,
             "/dev/null": stat.S_IFCHR | 0o666}
    plan = plan_mod.build(config, None, stat_path=_fake_stat(kinds))
    assert plan.ops[2:] == (
        ReadOnlyFile("/work/p/logs/run.jsonl", 7, len("/work/p/logs/run.jsonl")),
        ReadOnlyFile("/work/p/run.pcap", 7, len("/work/p/run.pcap")),
        Pin("/work/p/logs"),
        Pin("/work/p"),
        Pin("/work"),
    )  # each file once; /dev/null (not a regular file) is left alone; "/" needs no pin
    assert plan.describe()[-1] == "pin /work (cannot be renamed or removed)"


def test_a_missing_record_file_is_a_setup_error() -> None:
    config = SandboxConfig(["true"], network=False, read_only_files=("/nowhere/run.jsonl",))
    with pytest.raises(SetupError, match="/nowhere/run.jsonl: No such file or directory"):
        plan_mod.build(config, None, stat_path=_fake_stat({}))


def test_the_host_view_applies_the_path_options_too(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "token").write_text("x")
    rules = (PathRule("hide", str(tmp_path / "keys")), PathRule("hide", str(tmp_path / "token")),
             PathRule("read", str(tmp_path)))
    config = SandboxConfig(["true"], network=False,
                           filesystem=FilesystemOptions(view="host", paths=rules))
    plan = plan_mod.build(config, None, "/run/empty")
    # --read of the parent comes later and covers both hides: they go
    assert plan.ops[2:] == (Bind(str(tmp_path), str(tmp_path), writable=False,
                                 purpose="--read"),)
    rules = rules[2:] + rules[:2]  # now the hides come after: kept, and sealed at the end
    plan = plan_mod.build(dataclasses.replace(
        config, filesystem=FilesystemOptions(view="host", paths=rules)), None, "/run/empty")
    assert plan.ops[2:] == (
        Bind(str(tmp_path), str(tmp_path), writable=False, purpose="--read"),
        Hide(str(tmp_path / "keys"), True, 0, "", "--hide"),
        Hide(str(tmp_path / "token"), False, 0, "/run/empty", "--hide"),
        ReadOnly(str(tmp_path / "keys"), "hidden"),
    )
    assert "NewRoot" not in str(plan.ops)


# ------------------------------------------------------------------------------------------------
# The project view (the default)


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home ($HOME: ~ in a path option) with a project, two secrets and a cache; paths
    resolved (tmp_path may be a link)."""
    root = Path(os.path.realpath(tmp_path))
    monkeypatch.setenv("HOME", str(root / "home/u"))
    for d in ("home/u/proj/.git", "home/u/.ssh", "home/u/.cache", "data"):
        (root / d).mkdir(parents=True)
    (root / "home/u/.netrc").write_text("machine example.com password x\n")
    return root


def facts(tree: Path, cwd: str = "home/u/proj", **changes: object) -> HostFacts:
    home = str(tree / "home/u")
    values: dict[str, object] = dict(
        cwd=str(tree / cwd) if cwd != "/" else "/", home=home, home_layer=True,
        runtime_dir="/run/user/1000",
        top=(Entry("bin", "symlink", "usr/bin"), Entry("dev", "dir"), Entry("etc", "dir"),
             Entry("home", "dir"), Entry("proc", "dir"), Entry("run", "dir"),
             Entry("swapfile", "file"), Entry("sys", "dir"), Entry("tmp", "dir"),
             Entry("usr", "dir")),
        devices=("/dev/null", "/dev/tty"),
        secrets=tuple(rootfs.existing_secrets(["~/.ssh", "~/.netrc", "~/.aws"], home)),
        home_mounts=())
    values.update(changes)
    return HostFacts(**values)  # type: ignore[arg-type]


def project(host: HostFacts, *rules: PathRule, resolv: BindFile | None = None,
            records: tuple[Op, ...] = ()) -> plan_mod.Plan:
    return rootfs.project_plan(FilesystemOptions(paths=rules), host, resolv, records)


def after_base(plan: plan_mod.Plan) -> list[Op]:
    """The operations after /run's tmpfs (the layers, resolv.conf, records, seals, pivot)."""
    ops = list(plan.ops)
    return ops[ops.index(Tmpfs("/run", 0o755, "empty")) + 1:]


def test_the_project_view_in_order(tree: Path) -> None:
    home, proj = str(tree / "home/u"), str(tree / "home/u/proj")
    resolv = BindFile("/tmp/r", "/run/systemd/resolve/stub-resolv.conf", "a private resolv.conf",
                      "run tapbox -n")
    records = (ReadOnlyFile(f"{proj}/run.jsonl", 1, 2), Pin(proj))
    plan = project(facts(tree), resolv=resolv, records=records)
    assert plan.ops[:6] == (
        NewRoot(),
        Symlink("usr/bin", "/bin"),  # a top-level symlink is recreated
        Bind("/etc", "/etc", writable=False),  # directories read-only, with their submounts
        Bind("/home", "/home", writable=False),
        Bind("/swapfile", "/swapfile", writable=False, directory=False),
        Bind("/usr", "/usr", writable=False),
    )  # /dev, /proc, /run, /sys and /tmp are the view's own
    assert plan.ops[6:14] == (
        Tmpfs("/dev", 0o755, "a minimal /dev"), Device("/dev/null"), Device("/dev/tty"),
        plan_mod.Devpts("/dev/pts"), Symlink("pts/ptmx", "/dev/ptmx"),
        Symlink("/proc/self/fd", "/dev/fd"), Symlink("/proc/self/fd/0", "/dev/stdin"),
        Symlink("/proc/self/fd/1", "/dev/stdout"))
    assert plan.ops[15:20] == (
        Tmpfs("/dev/shm", 0o1777, "private"), FreshProc("/proc"), FreshSysfs("/sys", True),
        Tmpfs("/tmp", 0o1777, "private"), Tmpfs("/run", 0o755, "empty"))
    assert after_base(plan) == [
        HomeOverlay(home),
        Bind(proj, proj, writable=True, purpose="the working directory"),
        Tmpfs("/run/user/1000", 0o700, "$XDG_RUNTIME_DIR, empty"),
        Hide(f"{home}/.ssh", True, 0, "", "a secret"),
        Hide(f"{home}/.netrc", False, 0, "", "a secret"),  # ~/.aws does not exist
        resolv, *records,
        ReadOnly("/", "the new root"), ReadOnly("/dev", "the minimal /dev"),
        ReadOnly(f"{home}/.ssh", "hidden"),
        PivotRoot(proj),
    ]
    assert (plan.notices, plan.runtime_dir, plan.home) == ((), "/run/user/1000", home)
    lines = plan.describe()
    assert lines[0] == "new root: an empty tmpfs, filled by the operations below"
    assert f"overlay {home} (copy-on-write: writes go to a layer discarded at exit)" in lines
    assert f"bind {proj} (the working directory)" in lines
    assert f"hide {home}/.ssh (an empty directory, mode 0000; a secret)" in lines
    assert lines[-1] == f"pivot_root into the new root (the host's tree is gone); cd {proj}"


def test_path_options_apply_in_order_and_later_wins(tree: Path) -> None:
    proj = str(tree / "home/u/proj")
    git = f"{proj}/.git"
    # a read-only .git inside the writable project: hooks cannot be planted
    plan = project(facts(tree), PathRule("write", str(tree / "data")), PathRule("read", git))
    layers = after_base(plan)
    data = layers.index(Bind(str(tree / "data"), str(tree / "data"), writable=True,
                             purpose="--write"))
    assert layers[data + 1] == Bind(git, git, writable=False, purpose="--read")
    assert isinstance(layers[data + 2], ReadOnly)  # nothing but seals after the options
    # the other way round, the writable project covers .git again: the --read is left out
    plan = project(facts(tree), PathRule("read", git), PathRule("write", proj))
    assert Bind(git, git, writable=False, purpose="--read") not in plan.ops
    assert plan.ops.count(Bind(proj, proj, writable=True, purpose="--write")) == 1
    assert Bind(proj, proj, writable=True, purpose="the working directory") not in plan.ops


def test_writing_the_home_keeps_its_secrets_hidden_unless_named(tree: Path) -> None:
    home = str(tree / "home/u")
    plan = project(facts(tree), PathRule("write", "~"))  # ~ is $HOME as given to tapbox
    ops = after_base(plan)
    assert HomeOverlay(home) not in ops  # covered by the real home: no copy-on-write
    write = ops.index(Bind(home, home, writable=True, purpose="--write"))
    assert ops[write + 1:write + 3] == [Hide(f"{home}/.ssh", True, 0, "", "a secret"),
                                        Hide(f"{home}/.netrc", False, 0, "", "a secret")]
    assert ops.count(Hide(f"{home}/.ssh", True, 0, "", "a secret")) == 1  # the first one went
    plan = project(facts(tree), PathRule("write", "~"), PathRule("read", "~/.ssh"))
    assert not any(isinstance(op, Hide) and op.path.endswith(".ssh") for op in plan.ops)
    assert Bind(f"{home}/.ssh", f"{home}/.ssh", writable=False, purpose="--read") in plan.ops


def test_a_hidden_directory_is_searchable_only_when_something_is_shown_inside(tree: Path) -> None:
    home = str(tree / "home/u")
    (tree / "home/u/.ssh/known_hosts").write_text("")
    plan = project(facts(tree), PathRule("read", "~/.ssh/known_hosts"))
    assert Hide(f"{home}/.ssh", True, 0o111, "", "a secret") in plan.ops
    assert ReadOnly(f"{home}/.ssh", "hidden") in plan.ops
    assert Hide(f"{home}/.ssh", True, 0, "", "a secret") in project(facts(tree)).ops


def test_a_secret_is_shown_only_by_its_own_name_not_through_a_symlink(tree: Path) -> None:
    """A hostile repository's `.git -> ~/.ssh`: `--write .git` must not make ~/.ssh writable."""
    home, proj = tree / "home/u", tree / "home/u/proj"
    os.rmdir(proj / ".git")
    (proj / ".git").symlink_to(home / ".ssh")
    (proj / "key").symlink_to(home / ".ssh/id_test")
    (home / ".ssh/id_test").write_text("secret")
    for given in (".git", "key", str(proj / ".git")):
        with pytest.raises(SetupError, match=r"it leads through a symlink to .*/\.ssh.*, which "
                                             r"is hidden \(a secret .*/home/u/\.ssh\): name "
                                             r"that path itself"):
            project(facts(tree), PathRule("write", given))
    assert Bind(str(home / ".ssh"), str(home / ".ssh"), writable=False, purpose="--read") in \
        project(facts(tree), PathRule("read", "~/.ssh")).ops
    # a secret that is itself a link (~/.aws -> elsewhere): its name and its target both do
    (tree / "data/aws").mkdir()
    (home / ".aws").symlink_to(tree / "data/aws")
    for given in ("~/.aws", str(tree / "data/aws")):
        plan = project(facts(tree), PathRule("read", given))
        assert Bind(str(tree / "data/aws"), str(tree / "data/aws"), writable=False,
                    purpose="--read") in plan.ops
        assert Hide(str(tree / "data/aws"), True, 0, "", "a secret") not in plan.ops


def test_relative_and_tilde_paths(tree: Path) -> None:
    assert rootfs.resolve("../.cache", str(tree / "home/u/proj")) == str(tree / "home/u/.cache")
    assert rootfs.resolve("~/.cache", "/") == str(tree / "home/u/.cache")
    os.symlink(tree / "data", tree / "home/u/link")
    assert rootfs.resolve("~/link", "/") == str(tree / "data")  # symlinks resolved on the host


@pytest.mark.parametrize("cwd, expected", [
    ("/", "the working directory / is not made writable (the sandbox sees the host read-only): "
          "name what the command may write with --write PATH"),
    ("home/u", "the working directory ~ is your home: it stays copy-on-write (writes are "
               "discarded at exit); keep them with --write ~"),
    ("home", "the working directory {tree}/home holds your home, so it is not made writable "
             "(read-only in the sandbox): name what the command may write with --write PATH"),
])
def test_the_working_directory_is_not_made_writable_where_that_would_undo_the_view(
        tree: Path, cwd: str, expected: str) -> None:
    plan = project(facts(tree, cwd))
    assert plan.notices == (expected.format(tree=tree),)
    assert not any(isinstance(op, Bind) and op.writable for op in plan.ops)
    if cwd != "/":  # a --write that covers it says what the user wants: no notice
        assert project(facts(tree, cwd), PathRule("write", str(tree / cwd))).notices == ()


def test_the_sandboxs_own_directories_are_not_the_working_directory() -> None:
    host = facts(Path("/nonexistent"))._replace(cwd="/tmp", home=None, home_layer=False,
                                                secrets=())
    plan = project(host)
    assert plan.notices == ("the working directory /tmp is the sandbox's own, not the host's: "
                            "share the host's with --write /tmp",)
    assert HomeOverlay("/nonexistent/home/u") not in plan.ops and plan.home is None


def test_a_home_tapbox_cannot_read_is_left_read_only(tree: Path) -> None:
    plan = project(facts(tree, home_layer=False))
    assert not any(isinstance(op, HomeOverlay) for op in plan.ops)
    assert Hide(f"{tree}/home/u/.ssh", True, 0, "", "a secret") in plan.ops  # still hidden


def test_a_home_with_mounts_in_it_is_copy_on_write_around_them(tree: Path) -> None:
    """The kernel refuses an overlay in a user namespace over a directory with mounts below it
    that the namespace did not make: each directory without one gets an overlay of its own."""
    home = tree / "home/u"
    (home / "mnt/usb").mkdir(parents=True)
    (home / "mnt/docs").mkdir()
    mounts = (str(home / "mnt/usb"),)
    plan = project(facts(tree, home_mounts=mounts))
    layers = after_base(plan)
    split = "copy-on-write below it: something is mounted in it"
    assert layers[:5] == [
        Bind(str(home), str(home), writable=False, purpose=split),  # files in ~: read-only
        HomeOverlay(str(home / ".cache"), 0),  # (~/.ssh's is covered by its hiding: left out)
        Bind(str(home / "mnt"), str(home / "mnt"), writable=False, purpose=split),
        HomeOverlay(str(home / "mnt/docs"), 1),  # mnt/usb itself: read-only, as mounted
        Bind(str(home / "proj"), str(home / "proj"), writable=True,  # covers proj's overlay
             purpose="the working directory"),
    ]
    assert plan.layers == (str(home / ".cache"), str(home / "mnt/docs"))
    assert plan.home == str(home)


def test_a_hidden_working_directory_stops_tapbox(tree: Path) -> None:
    with pytest.raises(SetupError, match=r"the working directory .*/\.ssh is hidden in the "
                                         r"sandbox \(a secret .*--read or --write"):
        project(facts(tree, "home/u/.ssh"))


@pytest.mark.parametrize("rule, problem", [
    (PathRule("write", "/nonexistent/tapbox-x"), "--write /nonexistent/tapbox-x: No such file "
                                                 "or directory: give a path that exists"),
    (PathRule("read", "/nonexistent/tapbox-x"), "--read /nonexistent/tapbox-x: No such file"),
    (PathRule("tmpfs", "/nonexistent/tapbox-x"), "--tmpfs /nonexistent/tapbox-x: No such file"),
    (PathRule("tmpfs", "~/.netrc"), "--tmpfs ~/.netrc: not a directory"),
    (PathRule("write", "/"), "--write /: not for the whole filesystem: use --fs host"),
    (PathRule("hide", "/"), "--hide /: not for the whole filesystem"),
])
def test_bad_path_options_stop_tapbox_with_one_line(tree: Path, rule: PathRule,
                                                    problem: str) -> None:
    with pytest.raises(SetupError) as info:
        project(facts(tree), rule)
    assert str(info.value) == f"tapbox: {problem}" or \
        str(info.value).startswith(f"tapbox: {problem}"), str(info.value)
    assert "\n" not in str(info.value)


def test_hiding_what_does_not_exist_is_nothing(tree: Path) -> None:
    plan = project(facts(tree), PathRule("hide", str(tree / "nothing-here")))
    assert not any(isinstance(op, Hide) and "nothing-here" in op.path for op in plan.ops)


def test_operations_compare_as_operations() -> None:
    assert Pin("/x") != Device("/x") and Pin("/x") == Pin("/x")
    assert Tmpfs("/x", 0o755) != ("/x", 0o755, "") and len({Pin("/x"), Device("/x")}) == 2


def test_odd_bytes_in_paths_stay_as_they_are(tree: Path) -> None:
    odd = tree / "home/u/proj/a dir\nwith \udcff bytes"
    odd.mkdir()
    plan = project(facts(tree), PathRule("write", str(odd)))
    assert Bind(str(odd), str(odd), writable=True, purpose="--write") in plan.ops


def test_host_facts_read_the_real_host(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree / "home/u/proj")
    host = HostFacts.collect(root=True, environ={"HOME": str(tree / "home/u")})
    assert (host.cwd, host.home, host.home_layer) == (str(tree / "home/u/proj"),
                                                      str(tree / "home/u"), True)
    assert host.runtime_dir == "/run/user/0"  # no XDG_RUNTIME_DIR: --root's uid 0
    assert (str(tree / "home/u/.ssh"), True, str(tree / "home/u/.ssh")) in host.secrets
    assert (str(tree / "home/u/.netrc"), False, str(tree / "home/u/.netrc")) in host.secrets
    names = {entry.name: entry for entry in host.top}
    assert names["usr"].kind == "dir" and names["proc"].kind == "dir"
    if os.path.islink("/bin"):
        assert names["bin"] == Entry("bin", "symlink", os.readlink("/bin"))
    unset = HostFacts.collect(root=False, environ={"HOME": "relative"})
    assert unset.home is None and not unset.home_layer
    assert unset.runtime_dir == f"/run/user/{os.getuid()}"


def test_the_secrets_file_lists_what_the_issue_names() -> None:
    entries = rootfs.read_secrets()
    for needed in ("~/.ssh", "~/.gnupg", "~/.aws", "~/.azure", "~/.config/gcloud", "~/.kube",
                   "~/.docker", "~/.netrc", "~/.git-credentials", "~/.password-store",
                   "~/.local/share/keyrings", "~/.mozilla", "~/.config/google-chrome"):
        assert needed in entries
    assert all(e.startswith(("~/", "/")) for e in entries), entries


# ------------------------------------------------------------------------------------------------
# The command's environment


BASE = {"PATH": "/usr/bin", "HOME": "/home/u", "TERM": "xterm", "LANG": "C.UTF-8",
        "LC_TIME": "C", "USER": "u", "SHELL": "/bin/sh", "TZ": "UTC", "EDITOR": "vi",
        "SSH_AUTH_SOCK": "/run/user/1000/ssh", "DBUS_SESSION_BUS_ADDRESS": "unix:path=/x",
        "DISPLAY": ":0", "WAYLAND_DISPLAY": "wayland-0", "TMUX": "/tmp/tmux-1000/default,1,0",
        "XDG_RUNTIME_DIR": "/run/user/1000", "TAPBOX": "outer"}


def test_the_project_view_removes_what_names_a_hidden_socket() -> None:
    env = command_environment(BASE, project=True, runtime_dir="/run/user/1000")
    for name in ("SSH_AUTH_SOCK", "DBUS_SESSION_BUS_ADDRESS", "DISPLAY", "WAYLAND_DISPLAY",
                 "TMUX"):
        assert name not in env
    assert env["XDG_RUNTIME_DIR"] == "/run/user/1000" and env["TAPBOX"] == "1"
    assert env["EDITOR"] == "vi"
    host = command_environment(BASE, project=False, runtime_dir=None)
    assert host == {**BASE, "TAPBOX": "1"}  # --fs host: as it is


def test_clearenv_unsetenv_setenv_in_that_order() -> None:
    env = command_environment(BASE, project=True, runtime_dir="/run/user/7", clearenv=True,
                              unsetenv=["TZ", "LANG"], setenv=["LANG=fr_FR.UTF-8", "A=b=c", "E="])
    assert env == {"PATH": "/usr/bin", "HOME": "/home/u", "TERM": "xterm", "LC_TIME": "C",
                   "USER": "u", "SHELL": "/bin/sh", "LANG": "fr_FR.UTF-8", "A": "b=c", "E": "",
                   "XDG_RUNTIME_DIR": "/run/user/7", "TAPBOX": "1"}


# ------------------------------------------------------------------------------------------------
# What was discarded from the copy-on-write home


def _layers(tmp_path: Path) -> int:
    """Layers as tapbox's tmpfs holds them (N/upper), as overlayfs leaves an upper layer:
    files, a copied-up directory, a whiteout. Layer 0 is the home, layer 1 its ~/.local/bin."""
    upper = tmp_path / "0" / "upper"
    (upper / ".cache/pip/http").mkdir(parents=True)
    for i in range(3):
        (upper / f".cache/pip/http/{i}").write_bytes(b"x")
    (upper / ".local/share").mkdir(parents=True)  # a directory alone: not a change
    (upper / ".bashrc").write_text("curl ... | sh\n")
    (upper / ".cache/link").symlink_to("/etc/passwd")  # counted, never followed
    os.mknod(upper / ".profile", stat.S_IFCHR | 0o000, os.makedev(0, 0))  # a removal
    (tmp_path / "1" / "upper").mkdir(parents=True)
    (tmp_path / "1" / "upper" / "tool").write_text("#!/bin/sh\n")
    return os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)


def test_the_discarded_files_are_counted_by_place(tmp_path: Path) -> None:
    fd = _layers(tmp_path)
    try:
        found = discarded.count(fd, ["/home/u", "/home/u/.local/bin"], "/home/u")
    finally:
        os.close(fd)
    assert (found.files, found.removed, found.truncated) == (6, 1, False)
    assert found.places == {".cache": 4, ".bashrc": 1, ".profile": 1, ".local": 1}
    assert discarded.describe(found) == (
        "6 files written and 1 file removed in your home were discarded (~/.cache: 4, "
        "~/.bashrc: 1, ~/.local: 1, 1 more place): the sandbox's home is copy-on-write; keep "
        "such changes next time with --write ~/.cache, or review them before they are kept "
        "with --fs overlay")


def test_one_place_is_named_as_the_issue_shows(tmp_path: Path) -> None:
    found = discarded.Discarded(files=12, places={".local": 12}, directories={".local"})
    assert discarded.describe(found) == (
        "12 files written under ~/.local were discarded: the sandbox's home is copy-on-write; "
        "keep such changes next time with --write ~/.local, or review them before they are "
        "kept with --fs overlay")
    one = discarded.Discarded(files=1, places={".bashrc": 1})
    assert discarded.describe(one).startswith("1 file written to ~/.bashrc was discarded")
    assert discarded.describe(discarded.Discarded()) is None


def test_names_from_the_layer_are_escaped_and_the_walk_is_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    upper = tmp_path / "0" / "upper"
    (upper / "evil\x1b[2J").mkdir(parents=True)
    for i in range(30):
        (upper / f"evil\x1b[2J/{i}").write_text("")
    monkeypatch.setattr(discarded, "LIMIT", 10)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        found = discarded.count(fd, ["/h"], "/h")
    finally:
        os.close(fd)
    assert found.truncated
    line = discarded.describe(found)
    assert line is not None and "\x1b" not in line and "~/evil\\x1b[2J" in line
    assert line.startswith("more than 9 files written under")


# ------------------------------------------------------------------------------------------------
# The package's shape


def test_isolate_imports_neither_trio_nor_the_network_half() -> None:
    """DESIGN.md: isolate/ and the network half never import each other; no trio at import."""
    forbidden = ("trio", "netstack", "tapbox.engine", "tapbox.netstack", "tapbox.dns",
                 "tapbox.policy", "tapbox.net")
    for path in sorted(ISOLATE.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: a function may import trio lazily
            for name in imported_names(node):
                assert not any(name == f or name.startswith(f + ".") for f in forbidden), (
                    f"{path.name} imports {name} at module level"
                )


# ------------------------------------------------------------------------------------------------
# The copy-on-write view (--fs overlay)


def test_the_overlay_view_makes_every_readable_directory_copy_on_write(
        tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tapbox.isolate.layerdir import LayerDir
    from tapbox.isolate.plan import KeptLayer, KeptOverlay

    monkeypatch.setenv("XDG_DATA_HOME", str(tree / "data"))
    layer = LayerDir.create(None, ["make"], str(tree / "home/u/proj"))
    host = facts(tree, readable=frozenset({"etc", "usr"}))  # /home: tapbox may not read it
    plan = rootfs.project_plan(FilesystemOptions(view="overlay"), host, None, (), layer)
    assert plan.ops[:7] == (
        NewRoot(), KeptLayer(layer.path), Symlink("usr/bin", "/bin"),
        KeptOverlay("/etc", 0), Bind("/home", "/home", writable=False),
        Bind("/swapfile", "/swapfile", writable=False, directory=False),  # a file: read-only
        KeptOverlay("/usr", 1),
    )
    home = str(tree / "home/u")
    layers = after_base(plan)
    # The home lies under /tmp here (the view's own): an overlay of its own, which also covers
    # the working directory in it; no writable working directory; the layers hidden.
    assert layers[:2] == [
        KeptOverlay(home, 2), Tmpfs("/run/user/1000", 0o700, "$XDG_RUNTIME_DIR, empty")]
    hides = [Hide(str(tree / "data/tapbox/changes"), True, 0o111, "", "the kept layers"),
             Hide(layer.path, True, 0, "", "the kept layers")]
    assert all(op in plan.ops for op in hides)
    assert not any(isinstance(op, Bind) and op.writable for op in plan.ops)
    assert Hide(f"{home}/.ssh", True, 0, "", "a secret") in plan.ops  # secrets: still hidden
    assert dict(plan.kept) == {0: stat.S_IMODE(os.stat("/etc").st_mode),
                               1: stat.S_IMODE(os.stat("/usr").st_mode),
                               2: stat.S_IMODE(os.stat(home).st_mode)}
    assert layer.dirs == ["/etc", "/usr", home]
    assert plan.home is None and plan.notices == ()
    from tapbox.isolate import landlock  # --landlock reads every operation of this view

    rules = landlock.rules_for(plan)
    assert rules.unknown is None and "/usr" in rules.writable and "/home" not in rules.writable
    # --write punches a real hole in it
    plan = rootfs.project_plan(FilesystemOptions(view="overlay", paths=(
        PathRule("write", str(tree / "home/u/proj")),)), host, None, (), layer)
    assert Bind(str(tree / "home/u/proj"), str(tree / "home/u/proj"), writable=True,
                purpose="--write") in plan.ops
    # ... but no path option shows the layers: their hiding comes after every one of them
    plan = rootfs.project_plan(FilesystemOptions(view="overlay", paths=(
        PathRule("write", str(tree / "data")), PathRule("read", str(tree / "data/tapbox")))),
        host, None, (), layer)
    ops = list(plan.ops)
    assert ops.index(hides[0]) > ops.index(Bind(str(tree / "data/tapbox"),
                                                 str(tree / "data/tapbox"), writable=False,
                                                 purpose="--read"))
    assert ops.index(hides[1]) > ops.index(hides[0])
    # The project view hides them too: a sandbox that may write them could forge a layer.
    project_ops = rootfs.project_plan(FilesystemOptions(paths=(
        PathRule("write", str(tree / "data")),)), host, None, ()).ops
    assert Hide(str(tree / "data/tapbox/changes"), True, 0, "", "the kept layers") in \
        project_ops


def test_a_continued_layer_keeps_its_numbers(tree: Path) -> None:
    from tapbox.isolate.layerdir import LayerDir
    from tapbox.isolate.plan import KeptOverlay

    layer = LayerDir.create(str(tree / "layer"), ["a"], "/")
    host = facts(tree, readable=frozenset({"etc", "usr"}))
    layer.meta["dirs"] = ["/usr", "/old"]  # as an earlier run left it
    plan = rootfs.project_plan(FilesystemOptions(view="overlay"), host, None, (), layer)
    assert KeptOverlay("/usr", 0) in plan.ops and KeptOverlay("/etc", 2) in plan.ops


def test_a_home_under_a_directory_tapbox_cannot_read_gets_its_own_layer(
        tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/home of mode 0711: not layered as a whole (tapbox cannot list it), but the home and
    the working directory in it are still copy-on-write."""
    from tapbox.isolate.layerdir import LayerDir
    from tapbox.isolate.plan import KeptOverlay

    monkeypatch.setattr(rootfs.os, "access", lambda path, mode: True)
    layer = LayerDir.create(str(tree / "layer"), ["make"], "/home/u/proj")
    host = facts(tree, readable=frozenset({"usr"}))._replace(home="/home/u",
                                                               cwd="/home/u/proj")
    plan = rootfs.project_plan(FilesystemOptions(view="overlay"), host, None, (), layer)
    assert Bind("/home", "/home", writable=False) in plan.ops
    overlays = [op.path for op in plan.ops if isinstance(op, KeptOverlay)]
    assert overlays == ["/usr", "/home/u"]  # the working directory is in the home's layer
