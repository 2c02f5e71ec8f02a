"""The waiting queue: requests take turns by client, then by request, so nobody starves.

A plain FIFO lets one client lock the others out: 64 prompts of one completions request (or a
hundred small requests sent at once) all sit ahead of a later client's one request. Here the
queue is served round-robin over clients (`GenerationRequest.client`, the peer address as the
server fills it in), within a client round-robin over its requests (admission units: one HTTP
request's prompts), and within a request in prompt order, so a request's rows keep their order.
Preempted requests go back to a front lane that is served first, as before: they were admitted
already and hold output to continue.

The interface is the subset of `deque` the scheduler and engine use (append, appendleft, [0],
popleft, remove, clear, iteration, len), so the bookkeeping around it did not change.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator

from .sequence import RequestState


def _client(state: RequestState) -> object:
    return getattr(state.req, "client", None)


def _unit(state: RequestState) -> object:
    # Requests submitted without a unit (engine callers, tests) are a unit each.
    return getattr(state, "unit", None) or id(state)


class FairQueue:
    def __init__(self) -> None:
        self._front: deque[RequestState] = deque()  # preempted: served first, newest first
        # client -> unit -> its states in order; the first client (and its first unit) is next.
        self._lanes: OrderedDict[object, OrderedDict[object, deque[RequestState]]] = OrderedDict()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[RequestState]:
        """In no particular order (the engine only scans it, e.g. to cancel)."""
        yield from self._front
        for units in self._lanes.values():
            for states in units.values():
                yield from states

    def append(self, state: RequestState) -> None:
        units = self._lanes.setdefault(_client(state), OrderedDict())
        units.setdefault(_unit(state), deque()).append(state)
        self._len += 1

    def appendleft(self, state: RequestState) -> None:
        self._front.appendleft(state)
        self._len += 1

    def __getitem__(self, index: int) -> RequestState:
        if index != 0 or not self._len:
            raise IndexError("FairQueue only shows its head")
        if self._front:
            return self._front[0]
        units = next(iter(self._lanes.values()))
        return next(iter(units.values()))[0]

    def popleft(self) -> RequestState:
        """The head; its client then goes to the back of the clients, and its request to the
        back of that client's requests."""
        if self._front:
            self._len -= 1
            return self._front.popleft()
        if not self._len:
            raise IndexError("pop from an empty FairQueue")
        client, units = next(iter(self._lanes.items()))
        unit, states = next(iter(units.items()))
        state = states.popleft()
        self._len -= 1
        if states:
            units.move_to_end(unit)
        else:
            del units[unit]
        if units:
            self._lanes.move_to_end(client)
        else:
            del self._lanes[client]
        return state

    def remove(self, state: RequestState) -> None:
        if state in self._front:
            self._front.remove(state)
            self._len -= 1
            return
        client, unit = _client(state), _unit(state)
        units = self._lanes.get(client)
        states = units.get(unit) if units is not None else None
        if states is None or state not in states:
            raise ValueError("state not in the queue")
        states.remove(state)
        self._len -= 1
        if not states:
            del units[unit]  # type: ignore[union-attr]
            if not units:
                del self._lanes[client]

    def clear(self) -> None:
        self._front.clear()
        self._lanes.clear()
        self._len = 0
