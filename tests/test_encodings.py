"""Compressed encodings end to end over a real aggregator on 127.0.0.1: the committed model is
the outer step of exactly what the nodes sent (recomputed here from their spooled bytes), in
every plain encoding and every secure ring width; the compressed download rebuilds the
aggregator's model bit for bit on every node, and a newcomer gets the whole model."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from aggregator import secure_aggregation
from aggregator.config import FederationConfig, SecAggConfig, ServerConfig
from aggregator.server import RunningAggregator, start_aggregator
from node.client import AggregatorClient
from node.secure_aggregation import NodeSecAgg
from protos import delta_encoding as de
from protos import federation_pb2 as pb
from protos import pki
from protos.codec import SpooledPayload, encode
from tests.conftest import issue_kits
from tests.test_aggregator import join, make_config, train_tasks, wait_for_version
from tests.test_secure_aggregation import masked_payload

WEIGHTS = (3000, 1000)


@pytest.fixture
def serve() -> Iterator:
    servers: list[RunningAggregator] = []

    def start(config) -> RunningAggregator:
        servers.append(start_aggregator(config, log=lambda _m: None))
        return servers[-1]

    yield start
    for running in servers:
        running.stop(grace=0)


def random_delta(like: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 1e-3 * torch.randn(v.shape, generator=g) for k, v in like.items()}


def decoded_update(delta_before: dict, residual_after: dict) -> dict[str, torch.Tensor]:
    """What the aggregator received from a node: Δ minus what the encoding kept back."""
    return {k: delta_before[k] - residual_after[k] for k in delta_before}


def expected_fedavg(global0: dict, sent: list[dict], weights: tuple[int, ...]) -> dict:
    total = sum(weights)
    return {k: global0[k] - sum(w * s[k] for s, w in zip(sent, weights, strict=True)) / total
            for k in global0}  # fmt: skip


@pytest.mark.parametrize("encoding", ["bf16", "int8"])
def test_plain_encoding_commits_the_mean_of_what_the_nodes_sent(
    tmp_path: Path, serve, encoding: str
) -> None:
    config = make_config(tmp_path)
    config = dataclasses.replace(
        config, federation=dataclasses.replace(config.federation, delta_encoding=encoding)
    )
    agg = serve(config)
    clients = join(agg, "acme", "globex")
    assert clients[0].spec.delta_encoding == encoding
    train_tasks(clients)
    global0 = clients[0].pull_model(0)
    sent = []
    for i, (client, tokens) in enumerate(zip(clients, WEIGHTS, strict=True)):
        delta = random_delta(global0, i)
        before = {k: v.clone() for k, v in delta.items()}
        manifest = de.encode_update_in_place(delta, encoding, tmp_path / f"u{i}", client.spec.chunk_bytes,
                                             rounding_key=bytes([i]))  # fmt: skip
        sent.append(decoded_update(before, delta))
        payload = SpooledPayload(manifest, tmp_path / f"u{i}")
        assert client.push_payload(0, 0, payload, tokens, 2.0).complete
        params = sum(v.numel() for v in global0.values())
        assert manifest.total_bytes / params <= {"bf16": 2.0, "int8": 1.05}[encoding]
    wait_for_version(agg, 1)
    for name, want in expected_fedavg(global0, sent, WEIGHTS).items():
        torch.testing.assert_close(agg.coordinator.params[name], want, atol=1e-7, rtol=1e-6)


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pki.StartupKit]:
    return issue_kits(tmp_path_factory.mktemp("pki"), ("org0", "org1", "org2"))


@pytest.mark.parametrize("encoding", ["masked-int32", "masked-int16", "masked-int8"])
def test_secure_ring_commits_the_mean_of_what_the_nodes_sent(
    tmp_path: Path, serve, kits: dict, encoding: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Unmask in many small chunks (an odd size, across tensor boundaries): the narrow rings'
    # sums are widened into the fp32 mean in their own buffer, which is only right from the
    # last chunk down.
    monkeypatch.setattr(secure_aggregation, "UNMASK_CHUNK", 997)
    config = make_config(tmp_path)
    config = dataclasses.replace(
        config,
        server=dataclasses.replace(config.server, insecure=False, kit=str(kits["aggregator"].directory),
                                   long_poll_seconds=0.5),
        federation=dataclasses.replace(config.federation, delta_encoding=encoding),
        round=dataclasses.replace(config.round, min_nodes=3),
        secagg=SecAggConfig(clip=8e-3, stage_timeout_seconds=5.0),
    )  # fmt: skip
    agg = serve(config)
    orgs = ["org0", "org1", "org2"]
    weights = (2, 1, 1)
    unit = agg.coordinator.weight_unit
    sent: dict[int, dict] = {}
    global0: dict = {}

    def node(i: int) -> None:
        kit = kits[orgs[i]]
        client = AggregatorClient(agg.address, kit.organisation, kit=kit, rpc_timeout=10)
        client.join()
        sec = NodeSecAgg(client, kit, client.spec.federation_id)
        give_up = time.monotonic() + 60
        while time.monotonic() < give_up:
            task = client.get_task(wait_seconds=0.5)
            if task.kind == pb.Task.SECAGG_ADVERTISE_KEYS:
                sec.advertise(task.round)
            elif task.kind == pb.Task.SECAGG_SHARE_KEYS:
                sec.share(task.round)
            elif task.kind == pb.Task.SECAGG_UNMASK:
                sec.unmask(task.round)
                return
            elif task.kind == pb.Task.TRAIN:
                g = client.pull_model(task.model_version)
                global0.update(g)
                delta = random_delta(g, 10 + i)
                before = {k: v.clone() for k, v in delta.items()}
                tokens = int(unit * weights[i])
                payload = masked_payload(sec, task.round, task.model_version, delta, tokens,
                                         tmp_path / f"n{i}", encoding)  # fmt: skip
                sent[i] = decoded_update(before, delta)
                client.push_payload(task.round, task.model_version, payload, tokens, 1.0)

    threads = [threading.Thread(target=node, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    wait_for_version(agg, 1)
    want = expected_fedavg(global0, [sent[i] for i in range(3)], weights)
    for name in want:
        torch.testing.assert_close(agg.coordinator.params[name], want[name], atol=1e-7, rtol=1e-6)
    bits = de.RING_BITS[encoding]
    upload = (tmp_path / "n0").stat().st_size  # what node 0 sent
    assert upload == sum(v.numel() for v in global0.values()) * bits // 8


def test_compressed_download_is_bit_identical_and_a_newcomer_gets_the_whole_model(
    tmp_path: Path, serve
) -> None:
    config = make_config(tmp_path)
    config = dataclasses.replace(
        config,
        federation=dataclasses.replace(config.federation, download_encoding="int8", rounds=0),
    )
    agg = serve(config)
    a, b = join(agg, "acme", "globex")
    assert a.spec.download_encoding == "int8"
    held = {}
    for version in (0, 1):
        train_tasks([a, b])
        for i, client in enumerate((a, b)):
            if version == 0:
                held[i] = client.pull_model(0)
            g = held[i]
            delta = random_delta(g, 20 + 2 * version + i)
            assert client.push_update(version, version, delta, WEIGHTS[i], 2.0).complete
        wait_for_version(agg, version + 1)
        for i, client in enumerate((a, b)):
            updated = client.pull_from_previous(version + 1, held[i], "int8")
            assert updated is not None
            for name, tensor in agg.coordinator.params.items():
                assert torch.equal(updated[name], tensor), f"{name} differs after the update"
            held[i] = updated
    params = sum(v.numel() for v in held[0].values())
    update = agg.coordinator.download_update(2)
    assert update is not None and update.payload.manifest.total_bytes / params < 1.05
    # A newcomer (and a node that lost its copy) gets the whole model, equal to the same bits.
    (newcomer,) = join(agg, "initech")
    whole = newcomer.pull_model(2)
    assert encode(whole).manifest.sha256 == encode(agg.coordinator.params).manifest.sha256
    # A node whose copy is not version − 1 does not get a wrong model: the hash check fails.
    stale = {k: v.clone() for k, v in held[0].items()}
    next(iter(stale.values())).view(-1)[0] += 1.0
    train_tasks([a, b])
    for i, client in enumerate((a, b)):
        assert client.push_update(2, 2, random_delta(held[i], 40 + i), WEIGHTS[i], 2.0).complete
    wait_for_version(agg, 3)
    assert a.pull_from_previous(3, stale, "int8") is None


def test_bad_encoding_settings_are_refused(tmp_path: Path) -> None:
    from aggregator.config import AggregatorConfigError

    base = make_config(tmp_path)
    with pytest.raises(AggregatorConfigError, match="delta_encoding must be"):
        FederationConfig(delta_encoding="int4")
    with pytest.raises(AggregatorConfigError, match="download_encoding"):
        FederationConfig(download_encoding="masked-int8")
    with pytest.raises(AggregatorConfigError, match="multiple of 256"):
        dataclasses.replace(base, server=ServerConfig(port=0, chunk_bytes=4100, insecure=True),
                            federation=FederationConfig(delta_encoding="int8"))  # fmt: skip
    with pytest.raises(AggregatorConfigError, match="needs mutual TLS"):
        dataclasses.replace(base, federation=FederationConfig(delta_encoding="masked-int8"))
    assert np.isclose(de.wire_bytes_per_param("int8", 10**6), 256 / 252, rtol=1e-3)
