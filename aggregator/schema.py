"""The aggregator's tables (SQLAlchemy 2 declarative). Tensors never live here: checkpoints and
uploads are files, the database records their paths, sizes and sha256.

Changing a table means adding an Alembic migration in aggregator/migrations/versions/.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Federation(Base):
    __tablename__ = "federations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    spec_json: Mapped[str] = mapped_column(Text)  # the FederationSpec sent to nodes, as JSON
    status: Mapped[str] = mapped_column(String(16))  # running | finished
    created_at: Mapped[float] = mapped_column(Float)


class Node(Base):
    __tablename__ = "nodes"
    __table_args__ = (UniqueConstraint("federation_id", "organisation"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    federation_id: Mapped[str] = mapped_column(ForeignKey("federations.id"))
    organisation: Mapped[str] = mapped_column(String(200))
    token_sha256: Mapped[str] = mapped_column(String(64), index=True)  # session token, hashed
    capabilities_json: Mapped[str] = mapped_column(Text)
    joined_at: Mapped[float] = mapped_column(Float)


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("federation_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    federation_id: Mapped[str] = mapped_column(ForeignKey("federations.id"))
    number: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))  # see aggregator.rounds.RoundState
    base_version: Mapped[int] = mapped_column(Integer)
    participants_json: Mapped[str] = mapped_column(Text, default="[]")
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    deadline_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    result_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    outcome: Mapped[str] = mapped_column(Text, default="")


class Submission(Base):
    __tablename__ = "submissions"
    __table_args__ = (UniqueConstraint("round_id", "node_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"))
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"))
    num_tokens: Mapped[int] = mapped_column(BigInteger)
    train_loss: Mapped[float] = mapped_column(Float)
    nbytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))  # of the whole upload payload
    path: Mapped[str] = mapped_column(Text)  # the spooled upload
    completed_at: Mapped[float] = mapped_column(Float)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("federation_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    federation_id: Mapped[str] = mapped_column(ForeignKey("federations.id"))
    version: Mapped[int] = mapped_column(Integer)
    round_number: Mapped[int] = mapped_column(Integer)  # -1 for the initial model
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    nbytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)


class Metric(Base):
    __tablename__ = "metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    federation_id: Mapped[str] = mapped_column(ForeignKey("federations.id"))
    round_number: Mapped[int] = mapped_column(Integer, index=True)
    node_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    name: Mapped[str] = mapped_column(String(100))
    value: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
