"""step durability: how each step record was made durable, and when it committed; an index
for the input wait an inbound chat message may answer

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26

Plain ``ADD COLUMN``s (nullable, no default): SQLite alters the table in place, so the step
history triggers of 0001 keep working unchanged.
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "step",
        sa.Column("durability", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=True),
    )
    op.add_column("step", sa.Column("committed_at", sa.DateTime(timezone=True), nullable=True))
    # Every inbound message looks for its conversation's pending input wait: without this it
    # scanned every pending wait (timers included).
    op.create_index("ix_wait_conversation", "wait", ["conversation_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_wait_conversation", table_name="wait")
    # On SQLite, batch mode re-creates the step table, which drops its history triggers with
    # it: take them all down first and put them back afterwards.
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        from ledger import _sqlite

        for statement in _sqlite.DROP_TRIGGERS:
            op.execute(statement)
    with op.batch_alter_table("step", schema=None) as batch_op:
        batch_op.drop_column("committed_at")
        batch_op.drop_column("durability")
    if dialect == "sqlite":
        from ledger import _sqlite

        for statement in _sqlite.TRIGGERS:
            op.execute(statement)
