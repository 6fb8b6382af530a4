"""Does the federation pay off for each organisation? What `fedpt simulate` prints at the end.

An organisation joins to get a better model than it could train alone. Three models per
organisation, compared at equal tokens for that organisation (its R x H federated steps plus P
personalisation steps):

  global        the federation's final model;
  personalised  the final model adapted on the organisation's own data for P steps (its node
                does it: node/personalise.py);
  alone         `fedpt train` on the organisation's data alone for R x H + P steps, with the
                federation's model and inner settings and an evaluation every H steps.

Every figure on an organisation's own data is that organisation's validation split scored with
the inner loop's evaluation settings: the global models as its node reported them each round
(the `base_val_loss` metric) and at the end (nodes/ORG/final/report.json), the alone model from
its own evaluation log. "The union" is every organisation's validation split together, scored
here for the global model and every alone model alike.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aggregator.store import BASE_VAL_LOSS, MetricRow, RoundRow
from model.config import ModelConfig
from model.train_config import TrainConfig


def toml_table(name: str, values: dict) -> str:
    """A flat TOML table (numbers, bools, strings); None values are left out (the default)."""
    lines = [f"[{name}]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def write_train_config(path: Path, model_config: ModelConfig, train_config: TrainConfig) -> Path:
    """A federation's model and inner-loop settings as a `fedpt train --config` file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        toml_table("model", model_config.to_dict())
        + "\n"
        + toml_table("train", train_config.to_dict())
    )
    return path


class AloneTrainingFailed(RuntimeError):
    """An organisation's `fedpt train` run exited with an error (its log says why)."""


@dataclass
class Organisation:
    name: str
    source: str
    # model version -> this organisation's validation loss of the global model, as reported
    reported: dict[int, float] = field(default_factory=dict)
    final_version: int | None = None
    final_global: float | None = None
    personalised: float | None = None
    alone_curve: dict[int, float] = field(default_factory=dict)  # step -> validation loss
    alone_union: float | None = None  # the alone model on the union of validation splits

    def alone_at(self, step: int) -> float | None:
        return self.alone_curve.get(step)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("name", "source")}


def reported_losses(
    metrics: list[MetricRow], rounds: list[RoundRow], organisation_of: dict[str, str]
) -> dict[str, dict[int, float]]:
    """organisation -> {model version: the validation loss its node reported for it}."""
    base_version = {r.number: r.base_version for r in rounds}
    out: dict[str, dict[int, float]] = {}
    for m in metrics:
        if (
            m.name == BASE_VAL_LOSS
            and m.node_id in organisation_of
            and m.round_number in base_version
        ):
            out.setdefault(organisation_of[m.node_id], {})[base_version[m.round_number]] = m.value
    return out


def read_final_report(node_dir: Path) -> dict:
    """What a node wrote when the federation ended ({} when it did not)."""
    try:
        return json.loads((node_dir / "final" / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def eval_curve(run_dir: Path) -> dict[int, float]:
    """step -> validation loss, from a `fedpt train` run folder's metrics.jsonl."""
    curve = {}
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return curve
    for line in lines:
        entry = json.loads(line)
        if entry.get("event") == "eval":
            curve[int(entry["step"])] = float(entry["val_loss"])
    return curve


def train_alone(
    orgs: list[Organisation],
    config_path: Path,
    steps: int,
    seed: int,
    out_root: Path,
    spawn: Callable[[list[str], str], tuple[subprocess.Popen, Path]],
    parallel: int,
) -> None:
    """One `fedpt train` per organisation, `parallel` at a time; raises on a failed run."""
    pending = list(orgs)
    running: list[tuple[Organisation, subprocess.Popen, Path]] = []
    while pending or running:
        while pending and len(running) < parallel:
            org = pending.pop(0)
            args = ["train", "--config", str(config_path), "--data", org.source, "--steps",
                    str(steps), "--seed", str(seed), "--out", str(out_root / org.name)]  # fmt: skip
            proc, log_path = spawn(args, f"alone-{org.name}")
            running.append((org, proc, log_path))
        org, proc, log_path = running.pop(0)
        if proc.wait() != 0:
            raise AloneTrainingFailed(
                f"training {org.name} alone failed (exit {proc.returncode}); see {log_path}"
            )
        org.alone_curve = eval_curve(out_root / org.name)


def fmt(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.4f}"


def versus(fed: float | None, alone: float | None) -> str:
    """'fed / alone', with a '+' when the federated figure is the better (lower) one."""
    if fed is None or alone is None:
        return f"{fmt(fed)} / {fmt(alone)}"
    return f"{fmt(fed)} / {fmt(alone)}{' +' if fed < alone else '  '}"


def per_round_rows(orgs: list[Organisation], inner_steps: int) -> list[list[str]]:
    """version, steps per node, then per organisation 'global / alone at the same steps'."""
    versions = sorted({v for o in orgs for v in o.reported} | {
        o.final_version for o in orgs if o.final_version is not None})  # fmt: skip
    rows = []
    for v in versions:
        cells = []
        for o in orgs:
            fed = o.final_global if v == o.final_version else o.reported.get(v)
            cells.append(versus(fed, o.alone_at(v * inner_steps)) if v > 0 else fmt(fed))
        rows.append([str(v), str(v * inner_steps), *cells])
    return rows


def _better(fed: float | None, alone: float | None) -> str:
    return "-" if fed is None or alone is None else ("yes" if fed < alone else "no")


def verdict_rows(orgs: list[Organisation], total_steps: int) -> list[list[str]]:
    rows = []
    for o in orgs:
        alone = o.alone_at(total_steps)
        rows.append([o.name, fmt(alone), fmt(o.final_global), fmt(o.personalised),
                     _better(o.final_global, alone), _better(o.personalised, alone)])  # fmt: skip
    return rows
