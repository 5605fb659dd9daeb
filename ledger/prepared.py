"""Prepared statements for the ledger's hot paths: compiled once, run on SQLite's own cursor.

On SQLite every ledger write runs on one writer thread, and for the small statements of the hot
paths (taking a message, recording a step, finishing an item) SQLAlchemy's per-execution work
(execution context, parameter processing, result wrapping) cost three times what SQLite itself
did. A :class:`Prepared` statement is a SQLAlchemy Core statement compiled once, on first use,
for SQLite's ``pysqlite`` writer connection: :meth:`Prepared.run` hands the compiled SQL and the
parameters, converted by the very bind processors SQLAlchemy would use (the dialect's own: what
is stored is identical), to the connection's DB-API cursor, and converts the returned rows with
the columns' result processors. On any other driver (asyncpg) it is a plain ``conn.execute``.
Statements with expanding ``IN`` parameters are refused (their SQL changes per call).

Used only by the ledger's query modules, inside a transaction of :mod:`ledger.engine`.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

_Processor = Callable[[Any], Any] | None


class _Compiled:
    """The statement's SQL for pysqlite, with what converts its parameters and rows."""

    __slots__ = ("params", "results", "row", "sql")

    def __init__(self, statement: Any, dialect: sa.Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        if compiled.positiontup is None:
            raise ValueError("a prepared statement needs a positional paramstyle")
        self.sql: str = compiled.string
        self.params: list[tuple[str, bool, Any, _Processor]] = []
        for name in compiled.positiontup:
            bind = compiled.binds[name]
            if bind.expanding:
                raise ValueError(f"parameter {name!r} expands per call: bind each value")
            fixed = not bind.required and bind.callable is None
            value = bind.effective_value if fixed else None
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            self.params.append((name, fixed, value, process))
        columns = list(getattr(statement, "exported_columns", ()))
        self.results: list[_Processor] = [
            c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns
        ]
        self.row: Any = (
            namedtuple("Row", [c.key for c in columns], rename=True) if columns else None  # type: ignore[misc]
        )


class Prepared:
    """One statement, compiled for SQLite on first use (see the module docstring)."""

    __slots__ = ("_compiled", "statement")

    def __init__(self, statement: Any, dialect: sa.Dialect | None = None) -> None:
        self.statement = statement
        self._compiled: _Compiled | None = None
        if dialect is not None and dialect.driver == "pysqlite":
            self._compiled = _Compiled(statement, dialect)  # errors show at construction

    def run(self, conn: Connection, params: Mapping[str, Any] | None = None) -> list[Any]:
        """Execute with ``params``; the rows it returns (attribute access by column key)."""
        if conn.dialect.driver != "pysqlite":
            result = conn.execute(self.statement, params or {})
            return list(result) if result.returns_rows else []
        compiled = self._compiled
        if compiled is None:
            compiled = self._compiled = _Compiled(self.statement, conn.dialect)
        given = params or {}
        values = []
        for name, fixed, value, process in compiled.params:
            if not fixed:
                value = given[name]
            values.append(value if process is None else process(value))
        cursor = conn.connection.driver_connection.execute(compiled.sql, values)  # type: ignore[union-attr]
        if compiled.row is None:
            return []
        row, results = compiled.row, compiled.results
        return [
            row(*(v if p is None else p(v) for v, p in zip(raw, results, strict=True)))
            for raw in cursor.fetchall()
        ]

    def first(self, conn: Connection, params: Mapping[str, Any] | None = None) -> Any:
        """The first row, or ``None``."""
        rows = self.run(conn, params)
        return rows[0] if rows else None

    def scalar(self, conn: Connection, params: Mapping[str, Any] | None = None) -> Any:
        """The first column of the one row returned (``NoResultFound`` if there is none)."""
        rows = self.run(conn, params)
        if not rows:
            raise sa.exc.NoResultFound("no row was returned")
        return rows[0][0]


class PreparedCache:
    """Prepared statements keyed by what shapes them (an agent list, a set of columns),
    built by ``build(key)`` on first use. Bounded: the keys come from a few callers, and a
    caller that made new ones without end would only cost rebuilds."""

    def __init__(self, build: Callable[[Any], Prepared], limit: int = 64) -> None:
        self._build = build
        self._limit = limit
        self._statements: dict[Any, Prepared] = {}

    def get(self, key: Any) -> Prepared:
        stmt = self._statements.get(key)
        if stmt is None:
            if len(self._statements) >= self._limit:
                self._statements.clear()
            stmt = self._statements[key] = self._build(key)
        return stmt


__all__ = ["Prepared", "PreparedCache"]
