"""waits: signal names, escalation, one wait per step, scheduler wake-ups

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_PG_WAIT_NOTIFY = """
CREATE OR REPLACE FUNCTION tether_wait_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.state = 'pending' AND NEW.deadline IS NOT NULL THEN
    PERFORM pg_notify('tether_wait', NEW.id);
  END IF;
  RETURN NULL;
END $$
"""


def upgrade() -> None:
    with op.batch_alter_table("wait", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True)
        )
        batch_op.add_column(
            sa.Column("escalated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        )
        batch_op.drop_index("ix_wait_work")
        batch_op.drop_index("ix_wait_signal")
        batch_op.create_unique_constraint("uq_wait_step", ["work_id", "step_seq"])
        batch_op.create_index("ix_wait_signal_name", ["kind", "name", "key", "state"], unique=False)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_WAIT_NOTIFY)
        op.execute(
            "CREATE TRIGGER wait_deadline_notify AFTER INSERT OR UPDATE OF deadline ON wait "
            "FOR EACH ROW EXECUTE FUNCTION tether_wait_notify()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS wait_deadline_notify ON wait")
        op.execute("DROP FUNCTION IF EXISTS tether_wait_notify()")
    with op.batch_alter_table("wait", schema=None) as batch_op:
        batch_op.drop_index("ix_wait_signal_name")
        batch_op.drop_constraint("uq_wait_step", type_="unique")
        batch_op.create_index("ix_wait_signal", ["kind", "key", "state"], unique=False)
        batch_op.create_index("ix_wait_work", ["work_id"], unique=False)
        batch_op.drop_column("escalated_at")
        batch_op.drop_column("name")
