"""The one way mmloom puts a name into SQL text.

Rule (README "Threat model"): no SQL text is built from data, column names or paths.
Values and paths go in as parameters (``?``/``$name``) or through DuckDB's relational
API (``con.read_parquet(paths)``, ``duckdb.ColumnExpression(name)``); a column or view
name that must appear in SQL text goes through ``ident``.
"""

from __future__ import annotations


def ident(name: str) -> str:
    """``name`` as a DuckDB quoted identifier: any text, quotes doubled, never code."""
    if "\x00" in name:
        raise ValueError(f"an SQL identifier cannot hold NUL: {name[:40]!r}")
    return '"' + name.replace('"', '""') + '"'


def ident_list(names) -> str:
    """Comma-separated quoted identifiers (``EXCLUDE (...)``, column lists)."""
    return ", ".join(ident(n) for n in names)
