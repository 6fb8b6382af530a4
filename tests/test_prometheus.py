"""Prometheus metrics: a real aggregator on 127.0.0.1 scraped after a real round (rounds, bytes,
RPC latency, refusals, gauges), a failed round, the node's exporter, and their settings."""

from __future__ import annotations

import dataclasses
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.config import AggregatorConfigError, RoundConfig, ServerConfig, load_config
from fedpt.cli import aggregator_config_from_args, build_parser
from fedpt.simulate import free_port
from node.participant import NodeConfig, NodeConfigError, RoundRecord
from node.prometheus import NodeMetrics
from tests.test_aggregator import (
    join,
    local_params,
    make_config,
    train_tasks,
    wait_for_version,
)


def scrape(port: int) -> dict:
    """{family name: family} of http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict, sample_name: str, **labels: str) -> float:
    """The one sample named `sample_name` with these labels (among others)."""
    family_name = sample_name.removesuffix("_total")
    for suffix in ("_count", "_sum", "_bucket"):
        family_name = family_name.removesuffix(suffix)
    found = [
        s.value
        for s in families[family_name].samples
        if s.name == sample_name and labels.items() <= s.labels.items()
    ]
    assert len(found) == 1, f"{sample_name}{labels}: {found}"
    return found[0]


def with_metrics(config, **server):
    return dataclasses.replace(
        config, server=dataclasses.replace(config.server, metrics_port=free_port(), **server)
    )


def test_aggregator_metrics_after_a_round(tmp_path: Path, serve) -> None:
    agg = serve(with_metrics(make_config(tmp_path)))
    assert agg.metrics_port == agg.coordinator.config.server.metrics_port
    a, b = join(agg, "acme", "globex")
    train_tasks([a, b])
    global0 = a.pull_model(0)
    b.pull_model(0)
    fp32_bytes = sum(t.numel() * 4 for t in global0.values())
    for client, seed in ((a, 1), (b, 2)):
        local = local_params(global0, seed)
        delta = {k: global0[k] - local[k] for k in global0}
        assert client.push_update(0, 0, delta, num_tokens=1000, train_loss=2.0).complete
    wait_for_version(agg, 1)
    # A push for a round that has not started: refused before any chunk is taken.
    with pytest.raises(grpc.RpcError) as refused:
        a.push_update(7, 1, delta, num_tokens=1000, train_loss=2.0)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    for client in (a, b):  # both seen by GetTask just now
        client.get_task(wait_seconds=0)

    m = scrape(agg.metrics_port)
    assert value(m, "fedpt_rounds_total", outcome="committed") == 1
    assert value(m, "fedpt_rounds_total", outcome="failed") == 0
    assert value(m, "fedpt_round_duration_seconds_count") == 1
    assert value(m, "fedpt_round_phase_seconds_count", phase="training") == 1
    assert value(m, "fedpt_round_phase_seconds_count", phase="aggregating") == 1
    received = value(m, "fedpt_received_bytes_total")
    assert 2 * fp32_bytes <= received < 3 * fp32_bytes  # two fp32 updates, nothing refused
    assert value(m, "fedpt_accumulated_bytes_total") == received
    assert (
        value(m, "fedpt_upload_chunk_seconds_count")
        == 2 * agg.coordinator.payload.manifest.num_chunks
    )
    assert 2 * fp32_bytes <= value(m, "fedpt_sent_bytes_total") < 3 * fp32_bytes  # two pulls
    assert value(m, "fedpt_uploads_refused_total", reason="FAILED_PRECONDITION") == 1
    assert value(m, "fedpt_nodes_connected") == 2
    assert value(m, "fedpt_federation_model_version") == 1
    assert value(m, "fedpt_round_number") == 1
    for method, calls in (("Join", 2), ("PullModel", 2), ("PushUpdate", 3)):
        assert value(m, "fedpt_rpc_duration_seconds_count", method=method) == calls
    assert value(m, "fedpt_rpc_duration_seconds_count", method="GetTask") >= 4
    assert "fedpt_process_resident_memory_bytes" in m
    for family in m.values():
        assert family.name.startswith("fedpt_"), family.name
        if family.type == "counter":
            for sample in family.samples:
                assert sample.name.endswith(("_total", "_created")), sample.name
    a.close(), b.close()


def test_a_failed_round_is_counted_and_the_port_closes_on_stop(tmp_path: Path, serve) -> None:
    config = make_config(tmp_path, round=RoundConfig(min_nodes=2, timeout_seconds=1.0,
                                                     start_grace_seconds=0.1))  # fmt: skip
    agg = serve(with_metrics(config))
    clients = join(agg, "acme", "globex")
    train_tasks(clients)  # neither uploads: the deadline fails the round
    give_up = time.monotonic() + 15
    while value(scrape(agg.metrics_port), "fedpt_rounds_total", outcome="failed") < 1:
        assert time.monotonic() < give_up, "the failed round was not counted"
        time.sleep(0.1)
    m = scrape(agg.metrics_port)
    assert value(m, "fedpt_rounds_total", outcome="committed") == 0
    assert value(m, "fedpt_round_duration_seconds_count") == 1
    assert value(m, "fedpt_round_duration_seconds_sum") >= 1.0  # at least the deadline
    for client in clients:
        client.close()
    agg.stop(grace=0)
    with pytest.raises(OSError):
        scrape(agg.metrics_port)


def test_no_metrics_port_by_default(tmp_path: Path, serve) -> None:
    agg = serve(make_config(tmp_path))
    assert agg.coordinator.config.server.metrics_port == 0 and agg.metrics_port == 0


def test_node_exporter_reports_the_last_round() -> None:
    metrics = NodeMetrics()
    port = metrics.serve(free_port(), "127.0.0.1")
    try:
        assert value(scrape(port), "fedpt_node_rounds_total") == 0
        assert "fedpt_node_mfu_ratio" not in scrape(port)  # unknown until a step reports it
        metrics.record_round(RoundRecord(3, 2, wait_seconds=0.5, pull_seconds=1.0,
                                         train_seconds=4.0, push_seconds=0.25, train_loss=3.5,
                                         tokens=8000, pushed=True), inner_steps=50, mfu=0.4)  # fmt: skip
        # A round the node left before training: counted, nothing trained.
        metrics.record_round(RoundRecord(4, 3, 0.0, 0.1, 0.0, 0.0, float("nan"), 0, False), 50)
        m = scrape(port)
        assert value(m, "fedpt_node_rounds_total") == 2
        assert value(m, "fedpt_node_inner_steps_total") == 50
        assert value(m, "fedpt_node_tokens_total") == 8000
        assert value(m, "fedpt_node_train_loss") == 3.5
        assert value(m, "fedpt_node_tokens_per_second") == 2000
        assert value(m, "fedpt_node_mfu_ratio") == pytest.approx(0.4)
        assert value(m, "fedpt_node_model_version") == 3
        assert value(m, "fedpt_node_round_phase_seconds_count", phase="train") == 2
        assert value(m, "fedpt_node_round_phase_seconds_sum", phase="pull") == pytest.approx(1.1)
        assert value(m, "fedpt_node_round_phase_seconds_sum", phase="push") == 0.25
        assert all(name.startswith("fedpt_node_") for name in m)
    finally:
        metrics.stop()
    with pytest.raises(OSError):
        scrape(port)


def test_metrics_ports_are_checked_and_set_by_flags() -> None:
    with pytest.raises(AggregatorConfigError, match=r"\[server\] metrics_port 70000"):
        ServerConfig(metrics_port=70000, insecure=True)
    with pytest.raises(AggregatorConfigError, match="metrics_port must differ"):
        load_config(None, {"server": {"insecure": True, "port": 9000, "metrics_port": 9000}})
    with pytest.raises(NodeConfigError, match="metrics_port -1"):
        NodeConfig(data="builtin", insecure=True, metrics_port=-1)
    args = build_parser().parse_args(
        ["aggregator", "serve", "--insecure", "--metrics-port", "9464"]
    )
    assert aggregator_config_from_args(args).server.metrics_port == 9464
    join_args = build_parser().parse_args(["node", "join", "--metrics-port", "9465",
                                           "--metrics-host", "10.0.0.5"])  # fmt: skip
    assert (join_args.metrics_port, join_args.metrics_host) == (9465, "10.0.0.5")
    assert NodeConfig(data="builtin", insecure=True).metrics_host == "127.0.0.1"
