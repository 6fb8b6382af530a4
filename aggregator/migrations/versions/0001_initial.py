"""Initial schema: federations, nodes, rounds, submissions, checkpoints, metrics.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "federations",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False, unique=True),
        sa.Column("spec_json", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("federation_id", sa.String(36), sa.ForeignKey("federations.id"), nullable=False),
        sa.Column("organisation", sa.String(200), nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("capabilities_json", sa.Text, nullable=False),
        sa.Column("joined_at", sa.Float, nullable=False),
        sa.UniqueConstraint("federation_id", "organisation"),
    )
    op.create_index("ix_nodes_token_sha256", "nodes", ["token_sha256"])
    op.create_table(
        "rounds",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("federation_id", sa.String(36), sa.ForeignKey("federations.id"), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("base_version", sa.Integer, nullable=False),
        sa.Column("participants_json", sa.Text, nullable=False),
        sa.Column("started_at", sa.Float, nullable=True),
        sa.Column("deadline_at", sa.Float, nullable=True),
        sa.Column("finished_at", sa.Float, nullable=True),
        sa.Column("result_version", sa.Integer, nullable=True),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.UniqueConstraint("federation_id", "number"),
    )
    op.create_table(
        "submissions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("round_id", sa.Integer, sa.ForeignKey("rounds.id"), nullable=False),
        sa.Column("node_id", sa.String(40), sa.ForeignKey("nodes.id"), nullable=False),
        sa.Column("num_tokens", sa.BigInteger, nullable=False),
        sa.Column("train_loss", sa.Float, nullable=False),
        sa.Column("nbytes", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("completed_at", sa.Float, nullable=False),
        sa.UniqueConstraint("round_id", "node_id"),
    )
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("federation_id", sa.String(36), sa.ForeignKey("federations.id"), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("round_number", sa.Integer, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("nbytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("federation_id", "version"),
    )
    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("federation_id", sa.String(36), sa.ForeignKey("federations.id"), nullable=False),
        sa.Column("round_number", sa.Integer, nullable=False),
        sa.Column("node_id", sa.String(40), nullable=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_metrics_round_number", "metrics", ["round_number"])


def downgrade() -> None:
    for table in ("metrics", "checkpoints", "submissions", "rounds", "nodes", "federations"):
        op.drop_table(table)
