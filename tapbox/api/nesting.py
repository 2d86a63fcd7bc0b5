"""Whether a sandbox can be made from where this process is: the nesting check of the API.

How this works: a sandbox inside a tapbox sandbox fails today when it has a network (the inner
one cannot bind its resolv.conf over /etc/resolv.conf, which is the outer one's bind of a file
tapbox has already removed: issue 12 makes nesting work). That is found in this process's
mount table, not guessed from the TAPBOX variable (which any program may set or unset): a mount
on /etc/resolv.conf whose source is a deleted file. The API refuses such a run up front with a
message that says so, instead of the set-up error it would end in. When nesting works, this
check goes.
"""

from __future__ import annotations

from tapbox.options import RunOptions

RESOLV_CONF = "/etc/resolv.conf"


def nesting_problem(options: RunOptions) -> str | None:
    """Why a sandbox with these options cannot be made from here, or None."""
    if options.network.enabled and resolv_conf_is_stale():
        return ("tapbox: this process already runs in a tapbox sandbox, and a sandbox inside "
                "it cannot have a network yet (its /etc/resolv.conf is the outer sandbox's): "
                "use network=False inside, or give the outer sandbox what the inner one needs")
    return None


def resolv_conf_is_stale() -> bool:
    """Whether /etc/resolv.conf here is a bind mount of a file that no longer exists."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4 and _unescape(fields[4]) == RESOLV_CONF \
                and fields[3].endswith("//deleted"):
            return True
    return False


def _unescape(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040)."""
    if "\\" not in text:
        return text
    return text.encode("latin-1", "replace").decode("unicode_escape", "replace")
