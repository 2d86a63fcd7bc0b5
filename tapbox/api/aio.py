"""Awaiting a blocking function from asyncio or trio without owning the caller's loop.

How this works: `run_in_thread(fn, cancel)` runs `fn` in a thread of its own and waits for it
the way the running loop waits (an asyncio future completed from the thread, or a trio Event
set through the run's token), so the loop keeps serving its other tasks. If the awaiting task
is cancelled, `cancel()` is called (it must make `fn` return soon: tapbox kills the sandbox) and
the task still waits, shielded, for `fn` to finish before the cancellation goes on: nothing of a
run outlives the task that awaited it. Which loop is running is asked of the loops themselves
(trio's current task, then asyncio's running loop); an anyio program is one or the other.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from tapbox.errors import UsageError

T = TypeVar("T")


def require_loop() -> str:
    """"trio" or "asyncio", whichever runs this coroutine; UsageError if neither does."""
    if _in_trio():
        return "trio"
    try:
        import asyncio

        asyncio.get_running_loop()
    except RuntimeError:
        raise UsageError("tapbox: an async tapbox function must be awaited in an asyncio or "
                         "trio event loop (without one, call the plain function)") from None
    return "asyncio"


async def run_in_thread(fn: Callable[[], T], cancel: Callable[[], object]) -> T:
    box: dict[str, Any] = {}
    if require_loop() == "trio":
        return await _trio_wait(fn, cancel, box)
    return await _asyncio_wait(fn, cancel, box)


def _in_trio() -> bool:
    if "trio" not in sys.modules:
        return False
    import trio

    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


def _body(fn: Callable[[], Any], box: dict[str, Any], done: Callable[[], None]) -> None:
    try:
        box["value"] = fn()
    except BaseException as exc:  # noqa: B036 - handed to the awaiting task
        box["error"] = exc
    finally:
        done()


def _outcome(box: dict[str, Any]) -> Any:
    if "error" in box:
        raise box.pop("error")
    return box["value"]


async def _trio_wait(fn: Callable[[], T], cancel: Callable[[], object],
                     box: dict[str, Any]) -> T:
    import trio

    event = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def done() -> None:
        try:
            token.run_sync_soon(event.set)
        except trio.RunFinishedError:
            pass

    threading.Thread(target=_body, args=(fn, box, done), name="tapbox-await",
                     daemon=True).start()
    try:
        await event.wait()
    except BaseException:
        cancel()
        with trio.CancelScope(shield=True):
            await event.wait()
        raise
    return _outcome(box)


async def _asyncio_wait(fn: Callable[[], T], cancel: Callable[[], object],
                        box: dict[str, Any]) -> T:
    import asyncio

    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def set_done() -> None:
        if not future.done():
            future.set_result(None)

    def done() -> None:
        try:
            loop.call_soon_threadsafe(set_done)
        except RuntimeError:  # the loop is closed
            pass

    threading.Thread(target=_body, args=(fn, box, done), name="tapbox-await",
                     daemon=True).start()
    try:
        await asyncio.shield(future)
    except BaseException:
        cancel()
        while not future.done():
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError:
                continue
        raise
    return _outcome(box)
