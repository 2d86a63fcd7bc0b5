"""The process half of tapbox: the sandbox the command runs in (no trio, no network imports).

How the package is laid out, in the order one sandbox comes to be:

- config.py      SandboxConfig: what the caller asks for (command, network, uid, MTU...)
- plan.py        the filesystem set-up as data: an ordered list of operations, printable
- rootfs.py      the default (project) view's operations, from RunOptions.filesystem and the
                 host: read-only root, writable working directory, copy-on-write home, secrets
- environment.py the command's environment variables
- discarded.py   counting what the command wrote to its copy-on-write home, at exit
- layerdir.py    the kept layer of the copy-on-write view (--fs overlay) on disk: its
                 directory, metadata and baseline
- changes.py     reading a kept layer against the host: added, modified, deleted
- commit.py      applying a kept layer to the host, never following a symlink
- spawn.py       the parent's Sandbox: fork, receive the TAP fd, start(), wait()
- child.py       the forked child (enters the namespaces) and pid 1 (sets up, reports, locks
                 itself down, waits for the word)
- reaper.py      pid 1 afterwards: fork and exec the command, reap, forward signals, exit with it
- namespaces.py  user namespace and id maps, then network, mount, PID, IPC, UTS; the hostname
- tap.py         tap0: open /dev/net/tun inside the netns, configure the links (rtnetlink)
- mounts.py      executing the plan's operations
- syscalls.py    system-call policies as data: the default deny list, strict, groups, a builder
- seccomp.py     the system-call filter: a policy compiled and loaded with libseccomp (ctypes)
- supervisor.py  tapbox's side of the filter: names each refused call and answers it
- landlock.py    Landlock rules derived from the plan (--landlock)
- signals.py     SignalForwarder: signals sent to tapbox reach the command, Ctrl-C once
- diagnose.py    why a step failed, in one line naming cause and fix
- libc.py        the system calls Python's os lacks, through ctypes

Rule: nothing here imports trio at module level, nor anything of the network half (engine,
netstack, dns, policy); the two halves meet only through the TAP fd and a pid.
"""

from tapbox.errors import SetupError
from tapbox.isolate.config import SandboxConfig
from tapbox.isolate.signals import SignalForwarder
from tapbox.isolate.spawn import Sandbox

__all__ = ["Sandbox", "SandboxConfig", "SetupError", "SignalForwarder"]
