"""The engine's loop: file-descriptor readiness, timers and deferred work, inside one trio task.

How this works: the TAP device and every host socket of a proxied flow are registered, once,
in an epoll set of our own (level-triggered; an fd's interest changes only when what its owner
waits for changes). trio waits on that one epoll fd. When it is readable, `run` takes every
ready fd (`epoll.poll(0)`) and calls its owner's `ready(mask)`, then `flush()` — the engine
answering the stack's events and writing the frames they produced — and repeats until nothing
is ready. So the frames of one request and its answer are handled in one pass, with no task
switch and no per-wait epoll re-registration per fd (trio re-arms each fd it waits on).

Time: `call_at(when, fn)` timers sit in a heap; a second task sleeps until the earliest of them
and of the owner's own deadline (`deadline()`: the stack's next timer, held frames), then runs
`tick(now)`, what is due, and `flush()`.

Work that must await (a DNS answer from upstream, waiting for a flow's process to be found) is
`later(wait, then)`: a task awaits `wait()`, then runs `then(result)` and `flush()`. Nothing
else touches the stack outside a pass, so `flush()` is called in three places, all here: after
a readiness pass, after timers, after a `later` continuation.

Errors: an exception in an owner's `ready` or in a continuation goes to that owner's `crashed`
(the engine ends that one flow); one without a `crashed` (the TAP device's) ends the engine.
"""

from __future__ import annotations

import heapq
import itertools
import math
import select
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import trio

from tapbox.net.link import EngineError

T = TypeVar("T")

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP
EPOLLRDHUP = select.EPOLLRDHUP  # the peer shut down its sending side
PASSES_BEFORE_YIELD = 16  # readiness passes in a row before other tasks get a turn


class Owner(Protocol):
    def ready(self, mask: int) -> None: ...

    def crashed(self, exc: Exception) -> None: ...


class Timer:
    __slots__ = ("when", "fn", "owner", "cancelled")

    def __init__(self, when: float, fn: Callable[[], None], owner: Owner | None) -> None:
        self.when = when
        self.fn = fn
        self.owner = owner
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Reactor:
    def __init__(self, flush: Callable[[], None], tick: Callable[[float], None],
                 deadline: Callable[[], float | None]) -> None:
        self.flush = flush
        self.tick = tick
        self.deadline = deadline
        self.epoll = select.epoll()
        self.owners: dict[int, tuple[Owner | None, Callable[[int], None]]] = {}
        self.masks: dict[int, int] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None
        self._armed = math.inf

    # ----- registration ---------------------------------------------------------------------

    def watch(self, fd: int, mask: int, ready: Callable[[int], None],
              owner: Owner | None = None) -> None:
        """Call `ready(mask)` whenever `fd` is ready for `mask` (0: not now); `owner.crashed`
        gets what it raises (no owner: the engine ends)."""
        self.owners[fd] = (owner, ready)
        self.masks[fd] = 0
        self.interest(fd, mask)

    def interest(self, fd: int, mask: int) -> None:
        """Change what `fd` is waited for (an fd waited for nothing is out of the set, so a
        hang-up it cannot act on does not wake the loop)."""
        old = self.masks.get(fd)
        if old is None or old == mask or self.epoll.closed:
            return
        self.masks[fd] = mask
        if not mask:
            self.epoll.unregister(fd)
        elif not old:
            self.epoll.register(fd, mask)
        else:
            self.epoll.modify(fd, mask)

    def forget(self, fd: int) -> None:
        """Stop watching `fd` (before it is closed)."""
        self.interest(fd, 0)
        self.owners.pop(fd, None)
        self.masks.pop(fd, None)

    # ----- time -----------------------------------------------------------------------------

    @staticmethod
    def now() -> float:
        return trio.current_time()

    def call_at(self, when: float, fn: Callable[[], None], owner: Owner | None = None) -> Timer:
        """Call `fn()` at `when` unless cancelled first (`owner.crashed` gets what it raises)."""
        timer = Timer(when, fn, owner)
        heapq.heappush(self._timers, (when, next(self._order), timer))
        self.rearm()
        return timer

    def rearm(self) -> None:
        """Make the timer task wake at the earliest deadline (cheap when it is unchanged)."""
        if self._scope is None:
            return
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        at = timers[0][0] if timers else math.inf
        owner = self.deadline()
        if owner is not None and owner < at:
            at = owner
        if at != self._armed:
            self._armed = at
            self._scope.deadline = at

    # ----- deferred work --------------------------------------------------------------------

    def later(self, wait: Callable[[], Awaitable[T]], then: Callable[[T], None],
              owner: Owner) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._later, wait, then, owner)

    async def _later(self, wait: Callable[[], Awaitable[Any]], then: Callable[[Any], None],
                     owner: Owner) -> None:
        try:
            then(await wait())
        except EngineError:
            raise
        except Exception as exc:
            owner.crashed(exc)
        self.flush()

    # ----- the loop -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._timer_loop)
                task_status.started()
                await self._readiness_loop()
        finally:
            self._nursery = None

    def close(self) -> None:
        """After `run`: every fd forgotten, the epoll set closed."""
        self.epoll.close()

    async def _readiness_loop(self) -> None:
        epfd = self.epoll.fileno()
        poll = self.epoll.poll
        owners = self.owners
        while True:
            await trio.lowlevel.wait_readable(epfd)
            for _ in range(PASSES_BEFORE_YIELD):
                ready = poll(0)
                if not ready:
                    break
                for fd, mask in ready:
                    entry = owners.get(fd)
                    if entry is None:
                        continue
                    owner, on_ready = entry
                    if owner is None:
                        on_ready(mask)
                        continue
                    try:
                        on_ready(mask)
                    except EngineError:
                        raise
                    except Exception as exc:
                        owner.crashed(exc)
                self.flush()
            else:
                await trio.lowlevel.checkpoint()

    async def _timer_loop(self) -> None:
        while True:
            with trio.CancelScope() as scope:
                self._scope = scope
                self._armed = math.inf
                self.rearm()
                await trio.sleep_forever()
            self._scope = None
            now = trio.current_time()
            self.tick(now)
            timers = self._timers
            while timers and timers[0][0] <= now:
                timer = heapq.heappop(timers)[2]
                if timer.cancelled:
                    continue
                timer.cancelled = True
                try:
                    timer.fn()
                except EngineError:
                    raise
                except Exception as exc:
                    if timer.owner is None:
                        raise
                    timer.owner.crashed(exc)
            self.flush()
