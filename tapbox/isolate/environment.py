"""The command's environment variables, made in the parent from tapbox's own and the options.

How this works: `command_environment()` starts from tapbox's environment and applies, in this
order:

1. in the project view, the variables that name a socket or agent the view hides are removed
   (HIDDEN_SOCKETS: a program that finds SSH_AUTH_SOCK or DBUS_SESSION_BUS_ADDRESS would only
   fail on them, or look for them elsewhere), and XDG_RUNTIME_DIR names the sandbox's own empty
   directory;
2. --clearenv: only KEPT_BY_CLEARENV (and LC_*) are kept (and the private XDG_RUNTIME_DIR);
3. --unsetenv VAR, then --setenv VAR=VALUE (so a variable both unset and set ends set);
4. TAPBOX=1, so that a shell prompt or a script can tell it is sandboxed.

The host view keeps the environment as it is (steps 2 to 4 only).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

SANDBOX_ENVIRONMENT = {"TAPBOX": "1"}
HIDDEN_SOCKETS = (
    "SSH_AUTH_SOCK", "SSH_AGENT_PID", "GPG_AGENT_INFO",  # agents holding keys
    "DBUS_SESSION_BUS_ADDRESS", "DBUS_SYSTEM_BUS_ADDRESS",  # `systemd-run --user` and friends
    "DISPLAY", "WAYLAND_DISPLAY", "XAUTHORITY", "SESSION_MANAGER",  # keystrokes, screens
    "SWAYSOCK", "I3SOCK", "HYPRLAND_INSTANCE_SIGNATURE",  # compositors' command sockets
    "TMUX", "TMUX_PANE", "STY",  # terminal multiplexers: send-keys to a shell outside
    "PULSE_SERVER",
)
KEPT_BY_CLEARENV = ("PATH", "HOME", "TERM", "LANG", "USER", "SHELL", "TZ")


def command_environment(base: Mapping[str, str], *, project: bool, runtime_dir: str | None,
                        clearenv: bool = False, unsetenv: Iterable[str] = (),
                        setenv: Iterable[str] = ()) -> dict[str, str]:
    """The command's environment (see the module's docstring for the order)."""
    env = dict(base)
    if project:
        for name in HIDDEN_SOCKETS:
            env.pop(name, None)
    if clearenv:
        env = {name: value for name, value in env.items()
               if name in KEPT_BY_CLEARENV or name.startswith("LC_")}
    if project and runtime_dir is not None:
        env["XDG_RUNTIME_DIR"] = runtime_dir
    for name in unsetenv:
        env.pop(name, None)
    for item in setenv:
        name, _, value = item.partition("=")
        env[name] = value
    env.update(SANDBOX_ENVIRONMENT)
    return env
