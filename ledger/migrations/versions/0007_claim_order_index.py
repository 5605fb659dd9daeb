"""the claim index in the claim's order: ``(state, priority DESC, created_at, id)``

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26

The old ``(state, priority, created_at)`` index matched the claim's ``ORDER BY priority DESC,
created_at, id`` only in its first column, so every claim sorted all queued rows: with a backlog
of 3,000 messages a SQLite claim took 8 ms instead of 1.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_work_claim", table_name="work")
    op.create_index(
        "ix_work_claim",
        "work",
        ["state", sa.text("priority DESC"), "created_at", "id"],
    )


def downgrade() -> None:
    op.drop_index("ix_work_claim", table_name="work")
    op.create_index("ix_work_claim", "work", ["state", "priority", "created_at"])
