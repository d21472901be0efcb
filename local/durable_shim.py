"""Which task ids the Durable extension gives an out-of-process orchestrator's work, and when it starts it.

The extension never reads the SDK's task ids. Each episode it walks the action list the SDK returned through
its own orchestration context (``OutOfProcOrchestrationShim``, schema V2/V3): it starts one top-level action,
awaits it, then starts the next. Every task the Durable Task Framework creates takes the next number at
the moment it is created:

- an activity, sub-orchestration or timer when the shim reaches it; the children of a ``task_all`` /
  ``task_any`` (``Task.WhenAll`` / ``Task.WhenAny``) in list order, depth first;
- a retried call's timer when the failed attempt's event is processed, its next attempt when that timer's
  event is processed (DTFx ``RetryInterceptor``; a timer follows the last failed attempt too).

Events are processed in history order. ``Task.WhenAll`` completes when *all* its children have completed,
even after one failed, while the SDK's ``task_all`` fails at the first failure: the generator may yield its
next task before the shim starts it. The SDK numbers a task when the generator yields it, so whenever a
retry takes a number in between, the two disagree about ids and the orchestrator receives results for the
wrong tasks, or waits forever. :class:`Shim` numbers work the extension's way, so the local host shows that
on the first run instead of in production.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from local.durable_state import (
    CALL_ACTIVITY,
    CALL_ACTIVITY_RETRY,
    CALL_SUB,
    CALL_SUB_RETRY,
    CONTINUE_AS_NEW,
    CREATE_TIMER,
    EVENT_RAISED,
    SUB_COMPLETED,
    SUB_FAILED,
    TASK_COMPLETED,
    TASK_FAILED,
    TIMER_FIRED,
    UNSUPPORTED_ACTIONS,
    WAIT_FOR_EVENT,
    describe_action,
    describe_action_text,
)

WHEN_ANY, WHEN_ALL = 11, 12  # compound action types (V2/V3)


class ShimError(RuntimeError):
    """The orchestrator asked for something the local host cannot do (entities, durable HTTP)."""


@dataclass(eq=False)
class Node:
    """One awaited task of the shim: an atomic call or timer, a retried call, a compound, or an event wait."""

    action: dict[str, Any]
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    done: bool = False
    attempts: int = 0  # retried calls: attempts started so far


@dataclass
class Work:
    """Something the host must start, in the order the extension creates it.

    ``op``: ``call`` (an activity or sub-orchestration, also a retry attempt), ``timer`` (a user timer),
    ``retry_timer`` (the wait after a failed attempt) or ``continue`` (continue-as-new, takes no id).
    """

    op: str
    task_id: int | None
    action: dict[str, Any]


def top_level(actions: Any) -> list[dict[str, Any]]:
    """The top-level actions of a V2/V3 payload (``[[a, b, ...]]``); V1's list of lists is flattened."""
    if not actions:
        return []
    if len(actions) == 1 and isinstance(actions[0], list):
        return list(actions[0])
    out: list[dict[str, Any]] = []
    for group in actions:
        out.extend(group if isinstance(group, list) else [group])
    return out


class Shim:
    """The extension's side of one execution: what it has started, with which ids, and what it awaits."""

    def __init__(self) -> None:
        self.next_id = 0
        self.top: list[dict[str, Any]] = []
        self.cursor = 0  # next top-level action to start
        self.awaiting: Node | None = None
        self.issued: list[tuple[tuple[int, str | None], int | None]] = []  # (action, id), flattened order
        self.issued_nodes: list[Node] = []
        self.by_id: dict[int, tuple[Node, str]] = {}  # id -> (node, "task" | "attempt" | "retry_timer")
        self.waits: defaultdict[str, deque[Node]] = defaultdict(deque)
        self.buffered: defaultdict[str, int] = defaultdict(int)  # events raised before anyone waited
        self.work: list[Work] = []

    # ------------------------------------------------------------------ what the host asks
    @property
    def finished(self) -> bool:
        """Every action started and the last one complete: the extension now acts on isDone/error."""
        return self.cursor >= len(self.top) and (self.awaiting is None or self.awaiting.done)

    @property
    def waits_for_event(self) -> bool:
        return any(self.waits.values())

    def mismatch(self, flat: list[dict[str, Any]], allow_shorter: bool = False) -> str | None:
        """The extension's non-determinism error when replayed actions differ from those it started."""
        for index, (desc, task_id) in enumerate(self.issued):
            where = f"with sequence ID {task_id}" if task_id is not None else f"at position {index}"
            if index >= len(flat):
                if allow_shorter:  # an orchestrator that raised stops early; its error is the one to report
                    return None
                return (f"Non-Deterministic workflow detected: A previous execution of this orchestration "
                        f"scheduled {describe_action_text(desc)} {where}, but the current replay execution "
                        f"hasn't (yet?) scheduled this task. Was a change made to the orchestrator code "
                        f"after this instance had already started running?")
            now_desc = describe_action(flat[index])
            if now_desc != desc:
                return (f"Non-Deterministic workflow detected: A previous execution of this orchestration "
                        f"scheduled {describe_action_text(desc)} {where}, but the current replay execution "
                        f"scheduled {describe_action_text(now_desc)} instead. Was a change made to the "
                        f"orchestrator code after this instance had already started running?")
        return None

    def take_work(self) -> list[Work]:
        work, self.work = self.work, []
        return work

    # ------------------------------------------------------------------ one episode
    def update(self, actions: Any, flat: list[dict[str, Any]]) -> None:
        """Take this episode's action list (already checked with :meth:`mismatch`).

        A timer the orchestrator has cancelled completes now (the shim cancels its token). Actions beyond
        an await that completed in an earlier episode start here, before this episode's events; the
        extension would start them at that earlier point of its replay, which only differs when retries
        took ids in between.
        """
        self.top = top_level(actions)
        for node, action in zip(self.issued_nodes, flat, strict=False):
            if action.get("isCanceled") and not node.done and node.action.get("actionType") == CREATE_TIMER:
                self._complete(node)
        self._advance()

    def on_event(self, event: dict[str, Any]) -> None:
        """Process one history event of this episode, in history order."""
        kind = event["EventType"]
        if kind in (TASK_COMPLETED, SUB_COMPLETED, TASK_FAILED, SUB_FAILED):
            entry = self.by_id.pop(event.get("TaskScheduledId", -1), None)
            if entry is None:
                return
            node, role = entry
            if role == "attempt" and kind in (TASK_FAILED, SUB_FAILED):
                self._retry_timer(node)
            else:
                self._complete(node)
        elif kind == TIMER_FIRED:
            entry = self.by_id.pop(event.get("TimerId", -1), None)
            if entry is None:
                return
            node, role = entry
            if role == "retry_timer":
                self._retry_timer_fired(node)
            else:
                self._complete(node)
        elif kind == EVENT_RAISED:
            name = event.get("Name") or ""
            if self.waits[name]:
                self._complete(self.waits[name].popleft())
            else:
                self.buffered[name] += 1

    # ------------------------------------------------------------------ the shim's walk
    def _allocate(self) -> int:
        task_id = self.next_id
        self.next_id += 1
        return task_id

    def _advance(self) -> None:
        while (self.awaiting is None or self.awaiting.done) and self.cursor < len(self.top):
            action = self.top[self.cursor]
            self.cursor += 1
            self.awaiting = self._issue(action, None)

    def _issue(self, action: dict[str, Any], parent: Node | None) -> Node:
        node = Node(action, parent)
        kind = int(action.get("actionType", -1))
        if "compoundActions" in action:
            node.children = [self._issue(child, node) for child in action["compoundActions"]]
            if kind == WHEN_ANY:
                node.done = not node.children or any(c.done for c in node.children)
            else:
                node.done = all(c.done for c in node.children)
            return node
        if kind in UNSUPPORTED_ACTIONS:
            raise ShimError(f"LocalDurableHost does not support {UNSUPPORTED_ACTIONS[kind]} actions.")
        task_id: int | None = None
        if kind in (CALL_ACTIVITY, CALL_SUB, CREATE_TIMER):
            task_id = self._allocate()
            self.by_id[task_id] = (node, "task")
            self.work.append(Work("timer" if kind == CREATE_TIMER else "call", task_id, action))
            node.done = kind == CREATE_TIMER and bool(action.get("isCanceled"))
        elif kind in (CALL_ACTIVITY_RETRY, CALL_SUB_RETRY):
            task_id = self._allocate()
            node.attempts = 1
            self.by_id[task_id] = (node, "attempt")
            self.work.append(Work("call", task_id, action))
        elif kind == WAIT_FOR_EVENT:
            name = action.get("externalEventName") or ""
            if self.buffered[name]:
                self.buffered[name] -= 1
                node.done = True
            else:
                self.waits[name].append(node)
        elif kind == CONTINUE_AS_NEW:
            self.work.append(Work("continue", None, action))
            node.done = True
        else:
            raise ShimError(f"LocalDurableHost does not know action type {kind}.")
        self.issued.append((describe_action(action), task_id))
        self.issued_nodes.append(node)
        return node

    def _retry_timer(self, node: Node) -> None:
        timer_id = self._allocate()
        self.by_id[timer_id] = (node, "retry_timer")
        self.work.append(Work("retry_timer", timer_id, node.action))

    def _retry_timer_fired(self, node: Node) -> None:
        options = node.action.get("retryOptions") or {}
        if node.attempts >= int(options.get("maxNumberOfAttempts", 1)):
            self._complete(node)  # attempts exhausted: the call fails
            return
        node.attempts += 1
        attempt_id = self._allocate()
        self.by_id[attempt_id] = (node, "attempt")
        self.work.append(Work("call", attempt_id, node.action))

    def _complete(self, node: Node) -> None:
        if node.done:
            return
        node.done = True
        parent = node.parent
        if parent is not None:
            kind = int(parent.action.get("actionType", -1))
            if kind == WHEN_ANY or all(child.done for child in parent.children):
                self._complete(parent)
        elif node is self.awaiting:
            self._advance()
