"""The Python API: run a command, a function or the rest of this program in a sandbox.

How it is laid out:

- options.py  the keyword arguments -> RunOptions (the one place they are mapped)
- run.py      tapbox.run / run_async (a command) and tapbox.call / call_async (a function)
- job.py      one run inside the calling program: the sandbox forked and the engine served
              in a thread of the run's own, stdio and timeout in the caller's thread
- calls.py    tapbox.call's outcome: sent out of the sandbox, read back safely
- enter.py    tapbox.enter: the program goes on inside, the original process supervises
- records.py  Result, Flow, DnsQuery: what happened, read back from the run's event log
- aio.py      awaiting a run from asyncio or trio without owning the caller's loop

The public names are re-exported by the tapbox package itself (tapbox/__init__.py), and
documented in docs/api.md.
"""
