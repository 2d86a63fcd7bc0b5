"""The event log of a run of the Python API, and how the sandbox finds it.

How this works: every API run with a network keeps an event log (docs/audit.md): the caller's
`log=` file, or a private temporary one (`RunLog`), removed once its records are read back
(tapbox.run, tapbox.call) or once the sandbox is gone (tapbox.enter's supervisor). The sandbox's
environment names it (`command_env`: TAPBOX_LOG), so code inside can read its own records as
they grow (tapbox.inside()); the file is read-only there, as every record file is. The
sandbox's view shows it on purpose (a `read` path rule: the private log's directory, or the
caller's file), wherever it is: the project view's /tmp, for one, is the sandbox's own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import replace

from tapbox.api.records import LOG_VARIABLE, Records, read_log
from tapbox.options import PathRule, RunOptions


class RunLog:
    """The run's event log: the caller's `log=` file, or a temporary one of our own."""

    def __init__(self, options: RunOptions) -> None:
        self.caller = options.record.log
        self.directory: str | None = None
        self.options = options
        if options.network.enabled and self.caller is None:
            self.directory = tempfile.mkdtemp(prefix="tapbox-run-")
            path = os.path.join(self.directory, "events.jsonl")
            self.options = replace(options, record=replace(options.record, log=path))
        self.path = self.options.record.log
        if self.path is not None:  # (the file exists once the run is prepared)
            fs = self.options.filesystem
            shown = PathRule("read", self.directory or os.path.abspath(self.path))
            self.options = replace(self.options,
                                   filesystem=replace(fs, paths=(*fs.paths, shown)))

    def records(self) -> Records:
        if self.path is None:
            return Records()
        try:
            return read_log(self.path)
        except OSError:
            return Records()
        finally:
            self.remove()

    def remove(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


def command_env(env: Mapping[str, str] | None, log: str | None) -> dict[str, str] | None:
    """The command's environment, naming the run's event log (tapbox.inside())."""
    if env is None and log is None:
        return None
    chosen = {os.fsdecode(k): os.fsdecode(v) for k, v in (os.environ if env is None
                                                             else env).items()}
    chosen.pop(LOG_VARIABLE, None)  # an outer run's
    if log is not None:
        chosen[LOG_VARIABLE] = log
    return chosen
