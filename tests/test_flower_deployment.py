"""fedpt deployed on a real Flower federation: a SuperLink (TLS, SuperNode authentication) and two
SuperNodes on 127.0.0.1, `flwr run examples/flower-app`: the ServerApp serves fedpt's aggregator
(mutual TLS with the federation's kits on its own data plane) and every round's ClientApps run
fedpt nodes. Skipped without the `flower` extra."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from aggregator.store import Store
from fedpt.simulate import free_port
from protos import pki
from tests.flower_deployment import FlowerDeployment, alive

APP = Path(__file__).resolve().parents[1] / "examples" / "flower-app"
ORGS = ("web", "systems")


def aggregator_toml(root: Path, port: int) -> str:
    return f"""[server]
host = "127.0.0.1"
port = {port}
long_poll_seconds = 2.0
kit = "{root / "pki" / "aggregator"}"
[federation]
name = "flower-deployment"
rounds = 2
inner_steps = 3
[model]
preset = "tiny"
[round]
min_nodes = {len(ORGS)}
start_grace_seconds = 0.5
timeout_seconds = 300
[train]
micro_batch_size = 4
seq_len = 64
[store]
state_dir = "{root / "state"}"
"""


def fedpt_pki(root: Path) -> None:
    """The federation's CA and kits: the data plane is mutual TLS whatever Flower's TLS is."""
    pki.init_ca(root / "pki" / "ca", "fedpt test CA")
    pki.issue_kit(root / "pki" / "ca", "aggregator", root / "pki" / "aggregator",
                  server_hosts=["127.0.0.1"])  # fmt: skip
    for org in ORGS:
        pki.issue_kit(root / "pki" / "ca", org, root / "pki" / org)


@pytest.mark.slow
def test_flwr_run_deploys_fedpt_on_a_superlink_with_tls_and_supernode_auth(tmp_path: Path) -> None:
    """Two registered SuperNodes take part in 2 committed rounds (secure aggregation, the
    default encoding: its key, share and unmask stages are Flower messages, each answer
    verified against the federation's CA); a SuperNode whose key was never registered is
    refused by the SuperLink; every process is stopped by pid."""
    fedpt_pki(tmp_path)
    config = tmp_path / "aggregator.toml"
    config.write_text(aggregator_toml(tmp_path, free_port()))
    with FlowerDeployment(tmp_path / "flower") as flower:
        flower.start_superlink()
        for org in ORGS:
            private, public = flower.supernode_key(org)
            flower.register(public, org)
            flower.start_supernode(org, private, {
                "data": f"builtin:{org}", "work-dir": str(tmp_path / "nodes" / org),
                "kit": str(tmp_path / "pki" / org), "organisation": org,
            })  # fmt: skip
        stranger, _ = flower.supernode_key("stranger")  # never registered
        refused = flower.start_supernode("stranger", stranger, {"data": "x", "work-dir": "y"})
        for org in ORGS:
            flower.wait_connected(org)
        assert refused.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in flower.log_tail("stranger")

        run_id = flower.run_app(APP, {"aggregator-config": str(config)})
        row = flower.wait_finished(run_id, timeout=900)
        server_log = flower.run_log(run_id)
        assert row["status"] == "finished:completed", f"{row}\n{server_log[-3000:]}"
        assert "flower: round 1 over, 2 of 2 nodes answered" in server_log, server_log[-3000:]
        for number in (0, 1):
            for stage in ("keys", "shares", "unmask"):
                line = f"flower: round {number}: {stage} from 2 of 2 SuperNodes verified"
                assert line in server_log, server_log[-3000:]
        started = flower.pids()
        assert started
    assert not [pid for pid in started if alive(pid)]

    store = Store(f"sqlite:///{tmp_path / 'state' / 'fedpt.db'}")
    try:
        federation_id, spec_json, _ = store.find_federation("flower-deployment")
        rounds = store.rounds(federation_id)
    finally:
        store.close()
    assert json.loads(spec_json)["delta_encoding"].startswith("masked-")
    assert [(r.number, r.state, len(r.participants)) for r in rounds] == [
        (0, "COMMITTED", 2), (1, "COMMITTED", 2)
    ]  # fmt: skip
    for org in ORGS:
        work_dir = tmp_path / "nodes" / org
        records = [
            json.loads(line) for line in (work_dir / "rounds.jsonl").read_text().splitlines()
        ]
        assert [r["round"] for r in records if r["pushed"]] == [0, 1]
        assert not list((work_dir / "secagg").glob("round-*"))  # round secrets gone once unmasked
        assert json.loads((work_dir / "final" / "report.json").read_text())["version"] == 2
