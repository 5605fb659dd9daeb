"""Model calls as metered, memoized steps: ``await ctx.model_call(model=..., messages=[...])``.

A model call is one step (named ``model_call``) that asks an OpenAI-compatible chat-completions
endpoint (OpenAI, vLLM, Ollama, a llama.cpp server ...) through the ``openai`` package's
``AsyncOpenAI`` client, built once per worker process from ``TETHER_MODEL_BASE_URL`` and
``TETHER_MODEL_API_KEY``. Its result (a :class:`ModelResult`) is committed before
``model_call`` returns, so a replay returns it without asking the model again; beside it the
step records the model asked and the model that answered, a fingerprint of the prompt, the tool
calls requested, the tokens, the cost (from ``TETHER_MODEL_PRICES``), the finish reason and the
latency.

Inside the step, a rate-limited (429) or failing (5xx, connection) request is retried with
exponential backoff, never sooner than the endpoint's ``Retry-After``; a prompt longer than the
model's context fails the step at once with :class:`ContextLengthExceeded`.

Budgets: before a model call that is not recorded yet, the work item's and its conversation's
spend so far (the recorded costs, read from the ledger) is compared with the budget (the
agent's ``budget_per_work`` / ``budget_per_conversation``, else ``TETHER_BUDGET_PER_WORK`` /
``TETHER_BUDGET_PER_CONVERSATION``). At or over it, the work waits for the operator's approval
(a durable approval wait, itself a step): approving raises that budget once by its original
amount, denying fails the work with :class:`BudgetExceeded`. A recorded model call replays
without any check, so replay is deterministic.

Streaming (``stream=True``): deltas are accumulated and each partial text is handed to the
in-process listeners registered with :func:`listen_partial_output` (never persisted); only the
final message is the recorded result.

Imports the ledger and the worker's own modules (and ``openai``, lazily).
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from ledger.usage import BUDGET_WAIT_CONVERSATION, BUDGET_WAIT_WORK, OPERATOR_CHANNEL
from worker.errors import UnknownAgent, WorkflowError
from worker.registry import get_agent
from worker.retry import RetryPolicy

if TYPE_CHECKING:
    from openai import AsyncOpenAI

log = logging.getLogger(__name__)

#: the name of every model-call step
MODEL_STEP = "model_call"
#: the step itself is tried once: its requests are retried inside it (honouring Retry-After)
_ONE_ATTEMPT = RetryPolicy(max_attempts=1)
#: request parameters that change how the answer is delivered, not what is asked
_DELIVERY_PARAMS = frozenset({"stream", "stream_options", "timeout"})
#: what endpoints say when a prompt does not fit the model's context
_CONTEXT_CODES = frozenset({"context_length_exceeded", "string_above_max_length"})
_CONTEXT_TYPES = frozenset({"exceed_context_size_error"})
_CONTEXT_WORDS = (
    "context length",
    "context_length",
    "maximum context",
    "context window",
    "context size",
)


# -- errors ----------------------------------------------------------------------------------


class ModelCallError(WorkflowError):
    """A model call failed for good (the step records it as failed)."""


class ContextLengthExceeded(ModelCallError):
    """The prompt is longer than the model's context window: not retried."""


class ModelUnavailable(ModelCallError):
    """The endpoint kept answering 429 or 5xx (or could not be reached) through every retry."""


class ModelRequestRejected(ModelCallError):
    """The endpoint refused the request (a 4xx other than 429): not retried."""


class BudgetExceeded(WorkflowError):
    """An operator denied raising a spent budget: the work fails."""


# -- results ---------------------------------------------------------------------------------


class ToolCall(BaseModel):
    """One tool call the model asked for; ``arguments`` is the JSON text it produced."""

    id: str
    name: str
    arguments: str = "{}"

    def args(self) -> dict[str, Any]:
        """The arguments as a JSON object; ``ValueError`` if the model wrote something else."""
        value = json.loads(self.arguments or "{}")
        if not isinstance(value, dict):
            raise ValueError("tool arguments must be a JSON object")
        return value


class ModelResult(BaseModel):
    """What a model call returned (and what its step recorded)."""

    #: the model asked, and the one the endpoint says answered
    model: str
    answered_model: str | None = None
    content: str | None = None
    tool_calls: list[ToolCall] = []
    finish_reason: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    #: USD, from the price table; None when the model has no price (or usage was not reported)
    cost: float | None = None
    latency_ms: int = 0
    fingerprint: str = ""
    #: HTTP requests made (1 unless some were retried)
    requests: int = 1
    streamed: bool = False

    @property
    def message(self) -> dict[str, Any]:
        """The assistant message to append to the conversation for the next call."""
        out: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in self.tool_calls
            ]
        return out


@dataclass(frozen=True, slots=True)
class PartialOutput:
    """A streamed model call's text so far (``done``: the final text). Never persisted."""

    work_id: str
    seq: int
    text: str
    done: bool = False


# -- fingerprints ----------------------------------------------------------------------------


def canonical_json(value: Any) -> str:
    """``value`` as canonical JSON: sorted keys, no whitespace, UTF-8 as is."""
    return json.dumps(
        to_jsonable_python(value),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )


def prompt_fingerprint(
    model: str,
    messages: Any,
    tools: Any = None,
    params: Mapping[str, Any] | None = None,
) -> str:
    """``sha256:<hex>`` over the canonical JSON of the model, messages, tools and parameters
    (delivery options such as ``stream`` left out): the same prompt gives the same fingerprint
    in every process."""
    prompt = {
        "model": model,
        "messages": messages,
        "tools": tools or [],
        "params": {k: v for k, v in (params or {}).items() if k not in _DELIVERY_PARAMS},
    }
    return "sha256:" + hashlib.sha256(canonical_json(prompt).encode("utf-8")).hexdigest()


# -- streaming listeners ---------------------------------------------------------------------

_listeners: dict[str | None, list[Callable[[PartialOutput], None]]] = {}


def listen_partial_output(
    callback: Callable[[PartialOutput], None], work_id: str | None = None
) -> Callable[[], None]:
    """Call ``callback`` with each :class:`PartialOutput` of streamed model calls in this
    process (of ``work_id`` only, or of all work). Returns the function that unsubscribes."""
    _listeners.setdefault(work_id, []).append(callback)

    def unsubscribe() -> None:
        callbacks = _listeners.get(work_id, [])
        if callback in callbacks:
            callbacks.remove(callback)
        if not callbacks:
            _listeners.pop(work_id, None)

    return unsubscribe


def _publish(partial: PartialOutput) -> None:
    for callback in [*_listeners.get(partial.work_id, ()), *_listeners.get(None, ())]:
        try:
            callback(partial)
        except Exception:  # a broken listener must not break the model call
            log.exception("partial-output listener failed")


# -- the runtime: client, prices, retries ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float


def _price(value: Any) -> Price:
    if isinstance(value, Price):
        return value
    if isinstance(value, Mapping):
        return Price(float(value["input"]), float(value["output"]))
    if isinstance(value, tuple | list):
        return Price(float(value[0]), float(value[1]))
    return Price(float(value.input), float(value.output))  # config.settings.ModelPrice


@dataclass
class ModelRuntime:
    """A worker process's model endpoint: its client (built lazily, once per event loop),
    the price table, retry limits and the default budgets."""

    base_url: str = "https://api.openai.com/v1"
    api_key: str | None = None
    #: the model the built-in llm agent asks (``TETHER_MODEL``)
    model: str = "gpt-4o-mini"
    prices: Mapping[str, Any] = field(default_factory=dict)
    #: seconds one request may take
    timeout: float = 120.0
    #: retries of a 429 / 5xx / unreachable endpoint, within one step
    max_retries: int = 5
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    #: a Retry-After longer than this fails the call instead of holding the worker slot
    max_retry_after: float = 600.0
    budget_per_work: float | None = None
    budget_per_conversation: float | None = None

    def __post_init__(self) -> None:
        self.prices = {name: _price(p) for name, p in self.prices.items()}
        self._client_task: asyncio.Task[AsyncOpenAI] | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._warned: set[str] = set()

    @classmethod
    def from_settings(cls, settings: Any) -> ModelRuntime:
        """From :class:`config.Settings` (``TETHER_MODEL_*`` and ``TETHER_BUDGET_*``)."""
        key = settings.model_api_key
        return cls(
            base_url=settings.model_base_url,
            api_key=key.get_secret_value() if key is not None else None,
            model=settings.model,
            prices=dict(settings.model_prices),
            timeout=settings.model_timeout,
            max_retries=settings.model_max_retries,
            budget_per_work=settings.budget_per_work,
            budget_per_conversation=settings.budget_per_conversation,
        )

    async def client(self) -> AsyncOpenAI:
        """The ``AsyncOpenAI`` client (its own retries off: the step retries), built on first
        use in a thread: importing ``openai`` takes a second or more, which must not stall the
        event loop (and with it the worker's lease renewals)."""
        loop = asyncio.get_running_loop()
        task = self._client_task
        failed = task is not None and task.done() and (task.cancelled() or task.exception())
        if task is None or self._client_loop is not loop or failed:
            # one build per loop, however many calls start at once
            task = loop.create_task(asyncio.to_thread(self._build_client))
            self._client_task, self._client_loop = task, loop
        return await asyncio.shield(task)

    def _build_client(self) -> AsyncOpenAI:
        from openai import AsyncOpenAI

        client = AsyncOpenAI(
            base_url=self.base_url,
            # local servers (Ollama, llama.cpp, vLLM) take any key; the client wants one
            api_key=self.api_key or "not-needed",
            timeout=self.timeout,
            max_retries=0,
        )
        client.chat.completions  # noqa: B018  (its lazy imports happen here, too)
        return client

    async def aclose(self) -> None:
        """Close the client (if one was built on this loop)."""
        task, self._client_task = self._client_task, None
        if task is not None and task.done() and not task.cancelled() and not task.exception():
            await task.result().close()

    def price_of(self, asked: str, answered: str | None) -> Price | None:
        """The answered model's price, else the asked model's, else the longest table entry
        the answered model's name starts with (``gpt-4o-mini`` for
        ``gpt-4o-mini-2024-07-18``); None when the table has none."""
        for name in (answered, asked):
            if name and name in self.prices:
                return self.prices[name]
        if answered:
            known = [n for n in self.prices if answered.startswith(n)]
            if known:
                return self.prices[max(known, key=len)]
        return None

    def cost(
        self, asked: str, answered: str | None, input_tokens: int | None, output_tokens: int | None
    ) -> float | None:
        price = self.price_of(asked, answered)
        if price is None:
            name = answered or asked
            if name not in self._warned:
                self._warned.add(name)
                log.warning(
                    "no price for model %r in TETHER_MODEL_PRICES: its calls are recorded with "
                    "cost null (and count for no budget)",
                    name,
                )
            return None
        if input_tokens is None and output_tokens is None:
            return None
        usd = (input_tokens or 0) * price.input + (output_tokens or 0) * price.output
        return round(usd / 1_000_000, 12)

    def retry_delay(self, exc: BaseException, tries: int) -> float | None:
        """Seconds to wait before the next request after ``exc`` (the ``tries``-th failure),
        or None when ``exc`` is not worth retrying."""
        import openai

        retryable = isinstance(
            exc, openai.RateLimitError | openai.InternalServerError | openai.APIConnectionError
        ) or (isinstance(exc, openai.APIStatusError) and exc.status_code >= 500)
        if not retryable:
            return None
        backoff = min(self.backoff_initial * 2 ** (tries - 1), self.backoff_max)
        backoff *= random.uniform(0.8, 1.2)
        after = retry_after(exc)
        if after is None:
            return backoff
        return after * random.uniform(1.0, 1.05)  # never sooner than asked


def retry_after(exc: BaseException) -> float | None:
    """Seconds an error response asks to wait (``retry-after-ms``, or ``Retry-After`` as
    seconds or an HTTP date), or None."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(float(raw_ms) / 1000, 0.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(float(raw), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _is_context_length(exc: BaseException) -> bool:
    code = str(getattr(exc, "code", "") or "")
    kind = str(getattr(exc, "type", "") or "")
    if code in _CONTEXT_CODES or kind in _CONTEXT_TYPES:
        return True
    text = str(getattr(exc, "message", "") or exc).lower()
    return any(word in text for word in _CONTEXT_WORDS)


_ERROR_PREFIX = re.compile(r"^Error code: \d{3} - ")


def _error_text(exc: BaseException) -> str:
    text = _ERROR_PREFIX.sub("", str(getattr(exc, "message", "") or exc))
    return text if len(text) <= 500 else text[:499] + "…"


_default_runtime: ModelRuntime | None = None


def default_runtime() -> ModelRuntime:
    """This process's runtime from the settings (environment and ``TETHER_CONFIG``), for
    contexts whose worker pool was given none."""
    global _default_runtime
    if _default_runtime is None:
        from config import load_settings

        _default_runtime = ModelRuntime.from_settings(load_settings())
    return _default_runtime


def _usd(amount: float) -> str:
    """``2.00``, ``0.0015``: cents, or as many decimals (up to 6) as small amounts need."""
    if amount >= 1 or amount == 0:
        return f"{amount:.2f}"
    text = f"{amount:.6f}".rstrip("0")
    return text if len(text.split(".")[1]) >= 2 else f"{amount:.2f}"


def _step_meta(result: ModelResult) -> dict[str, Any]:
    """The step columns a model call fills (see ``ledger.steps.STEP_META_COLUMNS``)."""
    return {
        "model": result.model[:200],
        "model_answered": (result.answered_model or "")[:200] or None,
        "prompt_fingerprint": result.fingerprint,
        "input_tokens": result.input_tokens,
        "output_tokens": result.output_tokens,
        "total_tokens": result.total_tokens,
        "cost": result.cost,
        "finish_reason": (result.finish_reason or "")[:40] or None,
        "latency_ms": result.latency_ms,
        "tool_calls": [c.model_dump() for c in result.tool_calls],
        "output_committed": True,
    }


# -- the Context half ------------------------------------------------------------------------


class ModelCallsMixin:
    """The model-call half of :class:`worker.context.Context`."""

    # provided by Context
    _ledger: Any
    _claim: Any
    _recorded: dict[int, Any]
    _seq: int
    work_id: str
    agent: str
    #: this process's model runtime, set by the worker pool (None: from the settings)
    models: ModelRuntime | None = None

    if TYPE_CHECKING:

        async def step(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any: ...

        async def _wait(self, step_name: str, spec: dict[str, Any]) -> Any: ...

    async def model_call(
        self,
        *,
        messages: list[Any],
        model: str | None = None,
        tools: list[Any] | None = None,
        stream: bool = False,
        **params: Any,
    ) -> ModelResult:
        """Ask the model once, durably: a ``model_call`` step whose :class:`ModelResult` is
        recorded (with its metadata) and returned again on replay. ``model`` defaults to
        ``TETHER_MODEL``; ``params`` go to the chat-completions request as they are
        (``temperature``, ``max_tokens``, ``tool_choice`` ...). Budgets are checked first (see
        the module docstring). With ``stream=True`` partial text reaches the in-process
        listeners of :func:`listen_partial_output`; the recorded result is the same."""
        runtime = self.models or default_runtime()
        model = model or runtime.model
        messages_json = to_jsonable_python(messages)
        tools_json = to_jsonable_python(tools) if tools else None
        params_json = to_jsonable_python(params)
        fingerprint = prompt_fingerprint(model, messages_json, tools_json, params_json)
        request: dict[str, Any] = {"model": model, "messages": messages_json, **params_json}
        if tools_json:
            request["tools"] = tools_json
        await self._budget_gate(runtime)
        return await self.step(
            MODEL_STEP,
            self._model_step,
            runtime,
            request,
            fingerprint,
            stream,
            retry=_ONE_ATTEMPT,
            side_effect=True,
            record_meta=_step_meta,
        )

    async def _model_step(
        self, runtime: ModelRuntime, request: dict[str, Any], fingerprint: str, stream: bool
    ) -> ModelResult:
        client = await runtime.client()  # first: it imports openai off the event loop
        import openai

        from worker.context import current_step

        tries = 0
        while True:
            tries += 1
            started = time.monotonic()
            try:
                if stream:
                    result = await self._stream(client, request, current_step().seq)
                else:
                    result = _result(await client.chat.completions.create(**request))
                break
            except openai.BadRequestError as exc:
                if _is_context_length(exc):
                    raise ContextLengthExceeded(
                        f"the prompt does not fit the context window of model "
                        f"{request['model']!r}: {_error_text(exc)}"
                    ) from None
                raise ModelRequestRejected(
                    f"the model endpoint refused the request (400): {_error_text(exc)}"
                ) from None
            except openai.OpenAIError as exc:
                delay = runtime.retry_delay(exc, tries)
                status = getattr(exc, "status_code", None)
                what = f"{status} {_error_text(exc)}" if status else _error_text(exc)
                if delay is None:
                    raise ModelRequestRejected(
                        f"the model endpoint refused the request: {what}"
                    ) from None
                if tries > runtime.max_retries:
                    raise ModelUnavailable(
                        f"model {request['model']!r} still failing after {tries} request(s): {what}"
                    ) from None
                if delay > runtime.max_retry_after:
                    raise ModelUnavailable(
                        f"model {request['model']!r} asked to retry after {delay:.0f}s, longer "
                        f"than {runtime.max_retry_after:.0f}s: {what}"
                    ) from None
                log.warning(
                    "model call to %r failed (%s); request %d, retrying in %.2fs",
                    request["model"],
                    what,
                    tries,
                    delay,
                )
                await asyncio.sleep(delay)
        latency_ms = round((time.monotonic() - started) * 1000)
        return result.model_copy(
            update={
                "model": request["model"],
                "fingerprint": fingerprint,
                "latency_ms": latency_ms,
                "requests": tries,
                "cost": runtime.cost(
                    request["model"], result.answered_model, result.input_tokens,
                    result.output_tokens,
                ),
            }
        )  # fmt: skip

    async def _stream(self, client: Any, request: dict[str, Any], seq: int) -> ModelResult:
        body = {"stream_options": {"include_usage": True}, **request, "stream": True}
        text: list[str] = []
        calls: dict[int, dict[str, str]] = {}
        answered = finish = None
        usage: Any = None
        stream = await client.chat.completions.create(**body)
        async for chunk in stream:
            answered = getattr(chunk, "model", None) or answered
            usage = getattr(chunk, "usage", None) or usage
            for choice in chunk.choices or []:
                if choice.index != 0:
                    continue
                finish = choice.finish_reason or finish
                delta = choice.delta
                if delta is None:
                    continue
                if delta.content:
                    text.append(delta.content)
                    _publish(PartialOutput(self.work_id, seq, "".join(text)))
                for tc in delta.tool_calls or []:
                    call = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                    if tc.id:
                        call["id"] = tc.id
                    fn = getattr(tc, "function", None)
                    if fn is not None:
                        call["name"] += fn.name or ""
                        call["arguments"] += fn.arguments or ""
        content = "".join(text) if text else None
        _publish(PartialOutput(self.work_id, seq, content or "", done=True))
        return ModelResult(
            model=request["model"],
            answered_model=answered,
            content=content,
            tool_calls=[ToolCall(**calls[i]) for i in sorted(calls)],
            finish_reason=finish,
            input_tokens=getattr(usage, "prompt_tokens", None),
            output_tokens=getattr(usage, "completion_tokens", None),
            total_tokens=getattr(usage, "total_tokens", None),
            streamed=True,
        )

    # -- conversation history ----------------------------------------------------------------

    async def chat_history(self, *, limit: int = 50) -> list[dict[str, str]]:
        """This work item's conversation so far as chat messages (``{role, content}``, user
        and assistant, oldest first, at most ``limit``), up to and including the message(s)
        that started this work: later messages queued for other work are left out. A step
        (``history``): read once, replayed afterwards. ``[]`` without a conversation."""
        return await self.step("history", self._read_history, limit)

    async def _read_history(self, limit: int) -> list[dict[str, str]]:
        conversation_id = self._claim.conversation_id
        if conversation_id is None:
            return []
        # list_messages keeps the first rows of each direction: ask for plenty, keep the last
        messages = await self._ledger.list_messages(conversation_id, limit=max(limit * 10, 1000))
        mine = [m for m in messages if m["direction"] == "in" and m.get("work_id") == self.work_id]
        started = min((m["created_at"] for m in mine), default=None)
        out: list[dict[str, str]] = []
        for m in messages:
            later = started is not None and m["created_at"] > started
            if m["direction"] == "in" and later and m.get("work_id") != self.work_id:
                continue  # queued for later work: that work answers it
            if m.get("text"):
                role = "user" if m["direction"] == "in" else "assistant"
                out.append({"role": role, "content": m["text"]})
        return out[-limit:]

    # -- budgets -----------------------------------------------------------------------------

    def _budget_limits(self, runtime: ModelRuntime) -> dict[str, float]:
        try:
            spec = get_agent(self.agent)
        except UnknownAgent:
            spec = None
        per_work = getattr(spec, "budget_per_work", None)
        per_conversation = getattr(spec, "budget_per_conversation", None)
        limits = {
            "work": per_work if per_work is not None else runtime.budget_per_work,
            "conversation": (
                per_conversation if per_conversation is not None
                else runtime.budget_per_conversation
            ),
        }  # fmt: skip
        if self._claim.conversation_id is None:
            limits.pop("conversation")
        return {k: v for k, v in limits.items() if v is not None and math.isfinite(v)}

    async def _budget_gate(self, runtime: ModelRuntime) -> None:
        """Wait for an operator's approval while a budget is spent (see the module
        docstring). Replays recorded budget decisions; checks only at a fresh position."""
        limits: dict[str, float] | None = None
        while True:
            nxt = self._recorded.get(self._seq + 1)
            if nxt is not None and nxt.name in (BUDGET_WAIT_WORK, BUDGET_WAIT_CONVERSATION):
                await self._budget_approval(nxt.name, "budget exceeded")
                continue
            if nxt is not None:  # the recorded model call (or what _next will complain about)
                return
            if limits is None:
                limits = self._budget_limits(runtime)
            if not limits:
                return
            usage = await self._ledger.budget_usage(
                self.work_id, self._claim.conversation_id, seq=self._seq + 1
            )
            if usage.wait_at_seq is not None:  # opened before; resolved (or not) since
                await self._budget_approval(usage.wait_at_seq, "budget exceeded")
                continue
            over = None
            for scope, spent, raises in (
                ("work", usage.work_spent, usage.work_raises),
                ("conversation", usage.conversation_spent, usage.conversation_raises),
            ):
                if scope in limits and spent >= limits[scope] * (1 + raises):
                    over = (scope, spent, limits[scope] * (1 + raises), limits[scope])
                    break
            if over is None:
                return
            scope, spent, allowed, step = over
            name = BUDGET_WAIT_WORK if scope == "work" else BUDGET_WAIT_CONVERSATION
            where = "this work item" if scope == "work" else "this conversation"
            prompt = (
                f"budget exceeded: spent ${_usd(spent)} of ${_usd(allowed)} for {where} "
                f"(agent {self.agent}); approve to raise it by ${_usd(step)}"
            )
            await self._budget_approval(name, prompt)

    async def _budget_approval(self, name: str, prompt: str) -> None:
        outcome = await self._wait(
            name,
            {
                "kind": "approval",
                "name": name,
                "prompt": prompt,
                "channel": OPERATOR_CHANNEL,
                "on_timeout": "fail",
            },
        )
        resolution = outcome.resolution or {}
        if resolution.get("approved") is True:
            return
        try:
            asked = (await self._ledger.get_wait(outcome.wait_id)).prompt or prompt
        except Exception:
            asked = prompt
        asked = asked.split("; approve to raise", 1)[0]
        by = outcome.resolved_by or "the operator"
        comment = resolution.get("comment")
        raise BudgetExceeded(
            f"{asked}; {by} denied raising it" + (f" ({comment})" if comment else "")
        )


def _result(completion: Any) -> ModelResult:
    """A non-streamed chat completion as a :class:`ModelResult` (model/cost filled later)."""
    choices = completion.choices or []
    message = choices[0].message if choices else None
    calls = []
    for tc in getattr(message, "tool_calls", None) or []:
        fn = getattr(tc, "function", None)
        if fn is not None:
            calls.append(ToolCall(id=tc.id, name=fn.name, arguments=fn.arguments or "{}"))
    usage = completion.usage
    return ModelResult(
        model="",
        answered_model=completion.model,
        content=getattr(message, "content", None),
        tool_calls=calls,
        finish_reason=choices[0].finish_reason if choices else None,
        input_tokens=getattr(usage, "prompt_tokens", None),
        output_tokens=getattr(usage, "completion_tokens", None),
        total_tokens=getattr(usage, "total_tokens", None),
    )


__all__ = [
    "MODEL_STEP",
    "BudgetExceeded",
    "ContextLengthExceeded",
    "ModelCallError",
    "ModelCallsMixin",
    "ModelRequestRejected",
    "ModelResult",
    "ModelRuntime",
    "ModelUnavailable",
    "PartialOutput",
    "Price",
    "ToolCall",
    "default_runtime",
    "listen_partial_output",
    "prompt_fingerprint",
]
