"""The ``@agent`` registry: which functions workers can run, by name.

Imports nothing of Tether's but the worker's own modules.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter

from worker.errors import UnknownAgent
from worker.retry import NO_RETRY, RetryPolicy

#: when step records become durable (see :mod:`worker.context`)
DURABILITY_MODES = ("sync", "batched", "exit")

AgentFn = Callable[..., Awaitable[Any]]


ON_BUSY = ("enqueue", "interrupt", "reject", "collect")


@dataclass(frozen=True)
class AgentSpec:
    name: str
    fn: AgentFn
    retry: RetryPolicy
    input_adapter: TypeAdapter[Any] | None
    #: what a chat message does while this agent's work in the conversation is running
    on_busy: str = "enqueue"
    #: how long ``collect`` gathers messages into one input
    collect_window: float = 2.0
    #: when step records become durable by default: ``sync``, ``batched`` or ``exit``
    durability: str = "sync"
    #: USD its work may spend on model calls per work item / per conversation before an
    #: operator must approve more; None: the settings' (``math.inf``: unlimited)
    budget_per_work: float | None = None
    budget_per_conversation: float | None = None

    def parse_input(self, raw: Any) -> Any:
        return raw if self.input_adapter is None else self.input_adapter.validate_python(raw)


_REGISTRY: dict[str, AgentSpec] = {}


def agent(
    name: str,
    *,
    retry: RetryPolicy | None = None,
    on_busy: str = "enqueue",
    collect_window: float = 2.0,
    durability: str = "sync",
    budget_per_work: float | None = None,
    budget_per_conversation: float | None = None,
) -> Callable[[AgentFn], AgentFn]:
    """Register ``async def fn(ctx, input)`` as the agent ``name``.

    If ``input`` is annotated (a pydantic model, a dataclass, ``dict[str, int]`` …) the work
    item's JSON input is validated into that type before the function runs. ``retry`` governs
    whether an exception that escapes the function re-runs the work item (default: it fails).
    ``on_busy`` says what a chat message does while this agent works in the conversation:
    ``enqueue`` (run after it), ``interrupt`` (cancel it at its next step boundary and run),
    ``reject`` (reply that the agent is busy) or ``collect`` (merge the messages that arrive
    within ``collect_window`` seconds into one input). ``durability`` is when its steps'
    records become durable by default (``sync``: before the step returns; ``batched``: in the
    worker's next group commit; ``exit``: when the item finishes, fails or waits); semantic
    boundaries (side effects, replies, waits, spawns) always flush first.
    ``budget_per_work`` / ``budget_per_conversation`` (USD) override ``TETHER_BUDGET_PER_WORK``
    / ``TETHER_BUDGET_PER_CONVERSATION`` for this agent's model calls (``math.inf``: unlimited).
    """
    if on_busy not in ON_BUSY:
        raise ValueError(f"on_busy must be one of {ON_BUSY}, not {on_busy!r}")
    if collect_window <= 0:
        raise ValueError("collect_window must be positive")
    if durability not in DURABILITY_MODES:
        raise ValueError(f"durability must be one of {DURABILITY_MODES}, not {durability!r}")
    for label, budget in (
        ("budget_per_work", budget_per_work),
        ("budget_per_conversation", budget_per_conversation),
    ):
        if budget is not None and not budget > 0:
            raise ValueError(f"{label} must be a positive amount of USD, not {budget!r}")

    def register(fn: AgentFn) -> AgentFn:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"agent {name!r} must be an async function")
        existing = _REGISTRY.get(name)
        if existing is not None and existing.fn is not fn:
            same = (existing.fn.__module__, existing.fn.__qualname__) == (
                fn.__module__,
                fn.__qualname__,
            )
            if not same:
                raise ValueError(f"agent name {name!r} is already taken by {existing.fn!r}")
        _REGISTRY[name] = AgentSpec(
            name=name,
            fn=fn,
            retry=retry or NO_RETRY,
            input_adapter=_input_adapter(fn),
            on_busy=on_busy,
            collect_window=collect_window,
            durability=durability,
            budget_per_work=budget_per_work,
            budget_per_conversation=budget_per_conversation,
        )
        return fn

    return register


def _input_adapter(fn: AgentFn) -> TypeAdapter[Any] | None:
    params = list(inspect.signature(fn).parameters.values())
    if len(params) < 2:
        return None
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        return None
    hint = hints.get(params[1].name)
    if hint is None or hint is Any:
        return None
    return TypeAdapter(hint)


def get_agent(name: str) -> AgentSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownAgent(name, sorted(_REGISTRY)) from None


def chat_policies() -> dict[str, tuple[str, float]]:
    """``{agent: (on_busy, collect_window)}`` for the gateway's chat channels."""
    return {n: (spec.on_busy, spec.collect_window) for n, spec in _REGISTRY.items()}


def registered_agents() -> frozenset[str]:
    return frozenset(_REGISTRY)


def load_agent_modules(modules: Iterable[str]) -> frozenset[str]:
    """Import each module so its ``@agent`` functions register; returns all agent names."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ImportError(f"cannot import agent module {module!r}: {exc}") from exc
    return registered_agents()
