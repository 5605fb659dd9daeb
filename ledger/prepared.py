"""Prepared statements for the ledger's hot paths: compiled once, run on SQLite's own cursor.

On SQLite every ledger write runs on one writer thread, and for the small statements of the hot
paths (taking a message, recording a step, finishing an item) SQLAlchemy's per-execution work
(execution context, parameter processing, result wrapping) cost three times what SQLite itself
did. A :class:`Prepared` statement is a SQLAlchemy Core statement compiled once for the
dialect; on SQLite :meth:`Prepared.run` hands the compiled SQL and the parameters, converted by
the very bind processors SQLAlchemy would use (the dialect's own: what is stored is
identical), to the connection's DB-API cursor, and converts the returned rows with the
columns' result processors.
On PostgreSQL it is a plain ``conn.execute``. Statements with expanding ``IN`` parameters are
refused (their SQL changes per call).

Used only by the ledger's query modules, inside a transaction of :mod:`ledger.engine`.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

_Processor = Callable[[Any], Any] | None


class Prepared:
    """One statement, compiled once for ``dialect`` (see the module docstring)."""

    __slots__ = ("_native", "_params", "_results", "_row", "sql", "statement")

    def __init__(self, statement: Any, dialect: sa.Dialect) -> None:
        self.statement = statement
        self._native = dialect.name == "sqlite"
        self.sql = ""
        self._params: list[tuple[str, bool, Any, _Processor]] = []
        self._results: list[_Processor] = []
        self._row: Any = None
        if not self._native:
            return
        compiled = statement.compile(dialect=dialect)
        if compiled.positiontup is None:
            raise ValueError("a prepared statement needs a positional paramstyle")
        self.sql = compiled.string
        for name in compiled.positiontup:
            bind = compiled.binds[name]
            if bind.expanding:
                raise ValueError(f"parameter {name!r} expands per call: bind each value")
            fixed = not bind.required and bind.callable is None
            value = bind.effective_value if fixed else None
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            self._params.append((name, fixed, value, process))
        columns = list(getattr(statement, "exported_columns", ()))
        self._results = [
            c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns
        ]
        if columns:
            self._row = namedtuple("Row", [c.key for c in columns], rename=True)  # type: ignore[misc]

    def run(self, conn: Connection, params: Mapping[str, Any] | None = None) -> list[Any]:
        """Execute with ``params``; the rows it returns (attribute access by column key)."""
        if not self._native:
            result = conn.execute(self.statement, params or {})
            return list(result) if result.returns_rows else []
        given = params or {}
        values = []
        for name, fixed, value, process in self._params:
            if not fixed:
                value = given[name]
            values.append(value if process is None else process(value))
        cursor = conn.connection.driver_connection.execute(self.sql, values)  # type: ignore[union-attr]
        if self._row is None:
            return []
        results = self._results
        rows = []
        for raw in cursor.fetchall():
            rows.append(
                self._row(*(v if p is None else p(v) for v, p in zip(raw, results, strict=True)))
            )
        return rows

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


__all__ = ["Prepared"]
