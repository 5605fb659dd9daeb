"""model calls: the answered model, total tokens, latency, tool calls and output commitment

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27

Plain ``ADD COLUMN``s (nullable, no default): SQLite alters the table in place, so the step
history triggers of 0001 (which name only the columns they read) keep working unchanged.
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy import Text
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "step",
        sa.Column("model_answered", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
    )
    op.add_column("step", sa.Column("total_tokens", sa.Integer(), nullable=True))
    op.add_column("step", sa.Column("latency_ms", sa.Integer(), nullable=True))
    op.add_column(
        "step",
        sa.Column(
            "tool_calls",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
            nullable=True,
        ),
    )
    op.add_column("step", sa.Column("output_committed", sa.Boolean(), nullable=True))


def downgrade() -> None:
    # On SQLite, batch mode re-creates the step table (copy, drop, rename), which drops its
    # history triggers with it: take them all down first and put them back afterwards.
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        from ledger import _sqlite

        for statement in _sqlite.DROP_TRIGGERS:
            op.execute(statement)
    with op.batch_alter_table("step", schema=None) as batch_op:
        batch_op.drop_column("output_committed")
        batch_op.drop_column("tool_calls")
        batch_op.drop_column("latency_ms")
        batch_op.drop_column("total_tokens")
        batch_op.drop_column("model_answered")
    if dialect == "sqlite":
        from ledger import _sqlite

        for statement in _sqlite.TRIGGERS:
            op.execute(statement)
