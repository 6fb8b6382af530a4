"""A round's energy (node/energy.py): RAPL on a powercap tree written here (sub-zones and psys
not counted twice, a counter's wrap counted), NVML through a stand-in pynvml (no GPU here: the
one mock), what is not measurable and why; the aggregator's checks of the reported joules, and
a real node's round against a real aggregator storing what the node measured, also when it
pushes a round trained before a restart."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import sys
import threading
import time
import types
from pathlib import Path

import grpc
import pytest

from aggregator.config import FederationConfig, RoundConfig
from aggregator.store import CPU_ENERGY, GPU_ENERGY
from fedpt.simulate import free_port
from node.checkpoint import latest_checkpoint, read_state
from node.client import AggregatorClient
from node.energy import EnergyMeter, RaplEnergy, RoundEnergy, Unmeasurable
from node.parallel import DistEnv
from node.participant import NodeConfig, Participant, RoundRecord
from node.prometheus import NodeMetrics
from protos import federation_pb2 as pb
from protos.codec import encode
from tests.test_aggregator import (
    CHUNK,
    join,
    local_params,
    make_config,
    raw_push,
    state_fingerprint,
    train_tasks,
    wait_for_version,
    zero_delta,
)
from tests.test_prometheus import scrape, value

MAX_RANGE_UJ = 262_143_328_850  # a real package's max_energy_range_uj


# ---- RAPL ---------------------------------------------------------------------------------------
def set_uj(domain: Path, microjoules: int) -> None:
    """Write a counter as the kernel shows it: all at once (a reader never sees half a number)."""
    tmp = domain / "energy_uj.tmp"
    tmp.write_text(f"{microjoules}\n")
    os.replace(tmp, domain / "energy_uj")


def get_uj(domain: Path) -> int:
    return int((domain / "energy_uj").read_text())


def zone(
    root: Path, name: str, label: str, microjoules: int, max_range: int = MAX_RANGE_UJ
) -> Path:
    domain = root / name
    domain.mkdir(parents=True)
    (domain / "name").write_text(f"{label}\n")
    (domain / "max_energy_range_uj").write_text(f"{max_range}\n")
    set_uj(domain, microjoules)
    return domain


def powercap_tree(root: Path) -> dict[str, Path]:
    """Two packages (package 1 close to its counter's wrap), a core sub-zone of package 0, a
    psys domain (the whole platform, packages included) and the MMIO copy of package 0."""
    (root / "intel-rapl").mkdir(parents=True)  # the control type's own folder
    return {
        "package-0": zone(root, "intel-rapl:0", "package-0", 5_000_000),
        "package-1": zone(root, "intel-rapl:1", "package-1", 9_500_000, max_range=10_000_000),
        "core": zone(root, "intel-rapl:0:0", "core", 3_000_000),
        "psys": zone(root, "intel-rapl:2", "psys", 40_000_000),
        "mmio": zone(root, "intel-rapl-mmio:0", "package-0", 5_000_000),
    }


@pytest.fixture
def no_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynvml cannot be imported, whatever this machine has installed."""
    monkeypatch.setitem(sys.modules, "pynvml", None)


def test_rapl_sums_the_package_domains_only_and_counts_a_wrap(tmp_path: Path, no_pynvml) -> None:
    zones = powercap_tree(tmp_path / "powercap")
    meter = EnergyMeter(powercap_root=tmp_path / "powercap", wrap_check_seconds=None)
    assert meter.measured == {"CPU": "2 CPU package(s)"}
    meter.start()
    set_uj(zones["package-0"], 7_500_000)  # +2.5 J
    set_uj(zones["package-1"], 1_000_000)  # wrapped at 10 J: +0.5 J to the top, +1.0 J after it
    for name in ("core", "psys", "mmio"):  # inside the packages (or around them): not counted
        set_uj(zones[name], get_uj(zones[name]) + 100_000_000)
    energy = meter.stop()
    assert energy == RoundEnergy(gpu_joules=None, cpu_joules=4.0)
    assert meter.stop() == energy  # until the next start
    meter.start()
    set_uj(zones["package-0"], 7_750_000)
    assert meter.stop().cpu_joules == 0.25
    meter.close()


def test_reads_between_start_and_stop_count_every_wrap(tmp_path: Path) -> None:
    package = zone(tmp_path / "powercap", "amd-rapl:0", "package-0", 0, max_range=1_000_000)
    rapl = RaplEnergy(tmp_path / "powercap")
    for microjoules in (600_000, 100_000, 700_000, 200_000):  # 0.6 + 0.5 + 0.6 + 0.5 J
        set_uj(package, microjoules)
        rapl.joules()
    assert rapl.joules() == 2.2
    assert rapl.what == "1 CPU package(s)"


def test_the_meter_reads_rapl_in_between_so_a_long_round_sees_each_wrap(tmp_path: Path) -> None:
    package = zone(tmp_path / "powercap", "intel-rapl:0", "package-0", 0, max_range=1_000_000)
    with EnergyMeter(powercap_root=tmp_path / "powercap", wrap_check_seconds=0.01) as meter:
        rapl = meter._readers["CPU"]
        for microjoules in (600_000, 100_000, 700_000, 200_000):
            set_uj(package, microjoules)
            give_up = time.monotonic() + 10
            while rapl._last != [microjoules]:  # the meter's own thread has read it
                assert time.monotonic() < give_up, "the counter was not read in between"
                time.sleep(0.005)
    assert meter.stop().cpu_joules == 2.2  # four wraps' worth would be 0.2 J read only twice


def test_no_powercap_folder_is_not_measured_and_says_why(tmp_path: Path, no_pynvml) -> None:
    meter = EnergyMeter(powercap_root=tmp_path / "absent")
    meter.start()
    assert meter.stop() == RoundEnergy(None, None)
    assert "does not exist" in meter.unmeasured["CPU"] and str(tmp_path) in meter.unmeasured["CPU"]
    meter.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_root_only_rapl_counters_are_not_measured_and_say_so(tmp_path: Path) -> None:
    zones = powercap_tree(tmp_path / "powercap")
    (zones["package-1"] / "energy_uj").chmod(0)
    with pytest.raises(Unmeasurable, match="readable by root only"):
        RaplEnergy(tmp_path / "powercap")
    meter = EnergyMeter(powercap_root=tmp_path / "powercap")
    meter.start()
    assert meter.stop().cpu_joules is None
    assert "intel-rapl:1/energy_uj is readable by root only" in meter.unmeasured["CPU"]
    meter.close()


# ---- NVML ---------------------------------------------------------------------------------------
class NVMLError(Exception):
    pass


def fake_pynvml(energies_mj: list[int], **broken) -> types.ModuleType:
    """pynvml's calls the meter makes, over GPUs whose counters are `energies_mj` (millijoules,
    changed by the test); `broken`: function name -> exception it raises instead."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = NVMLError
    nvml.shut_down = False
    calls = {
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: setattr(nvml, "shut_down", True),
        "nvmlDeviceGetCount": lambda: len(energies_mj),
        "nvmlDeviceGetHandleByIndex": lambda i: ("handle", i),
        "nvmlDeviceGetHandleByUUID": lambda uuid: ("handle", int(uuid.removeprefix("GPU-"))),
        "nvmlDeviceGetTotalEnergyConsumption": lambda handle: energies_mj[handle[1]],
    }
    for name, call in calls.items():
        error = broken.get(name)
        if error is None:
            setattr(nvml, name, call)
        elif error is not AttributeError:  # AttributeError: an old pynvml without the call

            def fail(*_args, error=error):
                raise error

            setattr(nvml, name, fail)
    return nvml


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch):
    """Install a stand-in pynvml with these counters and broken calls; CUDA_VISIBLE_DEVICES unset."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def install(energies_mj: list[int], **broken) -> types.ModuleType:
        nvml = fake_pynvml(energies_mj, **broken)
        monkeypatch.setitem(sys.modules, "pynvml", nvml)
        return nvml

    return install


def gpu_round(
    tmp_path: Path, energies: list[int], spent: list[int]
) -> tuple[RoundEnergy, EnergyMeter]:
    meter = EnergyMeter(powercap_root=tmp_path / "absent")
    meter.start()
    for i, millijoules in enumerate(spent):
        energies[i] += millijoules
    energy = meter.stop()
    meter.close()
    return energy, meter


def test_nvml_sums_every_visible_gpu(tmp_path: Path, gpus) -> None:
    energies = [10_000_000, 20_000_000]
    nvml = gpus(energies)
    energy, meter = gpu_round(tmp_path, energies, [1500, 2750])
    assert energy == RoundEnergy(gpu_joules=4.25, cpu_joules=None)
    assert meter.measured == {"GPU": "2 GPU(s)"} and nvml.shut_down


@pytest.mark.parametrize("visible", ["1", "GPU-1", "1,1"])
def test_nvml_measures_only_the_gpus_cuda_visible_devices_names(
    tmp_path: Path, gpus, monkeypatch: pytest.MonkeyPatch, visible: str
) -> None:
    energies = [10_000_000, 20_000_000]
    gpus(energies)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    energy, meter = gpu_round(tmp_path, energies, [1500, 2750])
    assert energy.gpu_joules == 2.75 and meter.measured["GPU"] == "1 GPU(s)"


@pytest.mark.parametrize(
    "broken, visible, words",
    [
        ({"nvmlDeviceGetTotalEnergyConsumption": NVMLError("Not Supported")}, None,
         "NVML cannot read the GPUs' energy counters: Not Supported"),
        ({"nvmlDeviceGetTotalEnergyConsumption": AttributeError}, None,
         "NVML cannot read the GPUs' energy counters"),
        ({"nvmlInit": NVMLError("Driver Not Loaded")}, None, "NVML did not start: Driver Not Loaded"),
        ({}, "", "CUDA_VISIBLE_DEVICES hides every GPU"),
        ({}, "MIG-5c8f", "a MIG instance shares its GPU's energy counter"),
    ],
    ids=["counter not supported", "no such call", "no driver", "no visible GPU", "MIG"],
)  # fmt: skip
def test_nvml_failures_are_not_measured_with_a_reason(
    tmp_path: Path, gpus, monkeypatch: pytest.MonkeyPatch, broken: dict, visible, words: str
) -> None:
    energies = [10_000_000]
    nvml = gpus(energies, **broken)
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    energy, meter = gpu_round(tmp_path, energies, [1000])
    assert energy.gpu_joules is None
    assert words in meter.unmeasured["GPU"]
    assert nvml.shut_down or "nvmlInit" in broken  # NVML is left as it was found


def test_a_gpu_counter_failing_mid_run_is_not_measured_from_then_on(tmp_path: Path, gpus) -> None:
    energies = [10_000_000]
    nvml = gpus(energies)
    said: list[str] = []
    meter = EnergyMeter(powercap_root=tmp_path / "absent", log=said.append)
    meter.start()

    def lost(_handle):
        raise NVMLError("GPU is lost")

    nvml.nvmlDeviceGetTotalEnergyConsumption = lost
    assert meter.stop().gpu_joules is None
    assert said == ["energy: GPU no longer measured (NVMLError: GPU is lost)"]
    meter.start()
    assert meter.stop().gpu_joules is None and len(said) == 1 and nvml.shut_down
    meter.close()


def test_without_pynvml_the_gpu_is_not_measured_and_the_reason_says_so(
    tmp_path: Path, no_pynvml
) -> None:
    energy, meter = gpu_round(tmp_path, [], [])
    assert energy.gpu_joules is None
    assert meter.unmeasured["GPU"] == "pynvml is not installed: pip install 'fedpt[gpu]'"


@pytest.mark.skipif(Path("/sys/class/powercap").exists() or importlib.util.find_spec("pynvml")
                    is not None, reason="this machine has an energy counter")  # fmt: skip
def test_on_this_machine_nothing_is_measured_and_the_log_line_says_why() -> None:
    with EnergyMeter() as meter:
        pass
    assert meter.stop() == RoundEnergy(None, None)
    assert set(meter.unmeasured) == {"GPU", "CPU"} and all(meter.unmeasured.values())
    assert meter.describe() == (
        "energy: GPU not measured (pynvml is not installed: pip install 'fedpt[gpu]'); "
        "CPU not measured (/sys/class/powercap does not exist: no RAPL driver, or not Linux)"
    )


# ---- the node's Prometheus counters -------------------------------------------------------------
def test_node_exporter_adds_up_the_measured_joules_only() -> None:
    metrics = NodeMetrics()
    port = metrics.serve(free_port(), "127.0.0.1")
    try:
        trained = RoundRecord(0, 0, 0.0, 1.0, 2.0, 0.5, 3.0, 100, True)
        for gpu, cpu in ((120.5, 30.25), (None, 10.0), (None, None)):
            metrics.record_round(dataclasses.replace(trained, gpu_energy_joules=gpu,
                                                     cpu_energy_joules=cpu), inner_steps=2)  # fmt: skip
        m = scrape(port)
        assert value(m, "fedpt_node_gpu_energy_joules_total") == 120.5
        assert value(m, "fedpt_node_cpu_energy_joules_total") == 40.25
    finally:
        metrics.stop()


# ---- the aggregator's intake --------------------------------------------------------------------
ENERGY_REFUSALS = {
    "nan GPU energy": {"gpu_energy_joules": math.nan},
    "infinite CPU energy": {"cpu_energy_joules": math.inf},
    "negative CPU energy": {"cpu_energy_joules": -1.0},
    "absurd GPU energy": {"gpu_energy_joules": 2e12},
}


@pytest.mark.parametrize("case", ENERGY_REFUSALS)
def test_impossible_energy_is_refused_and_changes_nothing(
    tmp_path: Path,
    serve,
    case: str,
) -> None:
    (field,) = ENERGY_REFUSALS[case]
    agg = serve(make_config(tmp_path))
    a, b = join(agg, "acme", "globex")
    train_tasks([a, b])
    global0 = a.pull_model(0)
    payload = encode(zero_delta(global0), CHUNK)
    header = pb.UpdateHeader(round=0, base_version=0, num_tokens=10, train_loss=1.0,
                             base_val_loss=2.0, **ENERGY_REFUSALS[case])  # fmt: skip
    before = state_fingerprint(agg, tmp_path / "state")
    accumulated = agg.coordinator.accumulator._sum.copy()
    with pytest.raises(grpc.RpcError) as info:
        raw_push(a, header, payload)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert field in info.value.details()
    assert state_fingerprint(agg, tmp_path / "state") == before
    assert (agg.coordinator.accumulator._sum == accumulated).all()
    assert a.push_update(0, 0, zero_delta(global0), num_tokens=10, train_loss=1.0).complete


def test_reported_energy_is_stored_per_node_and_round(tmp_path: Path, serve) -> None:
    agg = serve(make_config(tmp_path))
    a, b, c = join(agg, "acme", "globex", "initech")
    train_tasks([a, b, c])
    global0 = a.pull_model(0)
    sent = {a: (1e12, 0.0), b: (None, 812.5), c: (None, None)}  # the limit is allowed
    for seed, (client, (gpu, cpu)) in enumerate(sent.items()):
        delta = {k: global0[k] - v for k, v in local_params(global0, seed).items()}
        assert client.push_update(0, 0, delta, num_tokens=100, train_loss=2.0,
                                  gpu_energy_joules=gpu, cpu_energy_joules=cpu).complete  # fmt: skip
    wait_for_version(agg, 1)
    stored = {(m.round_number, m.node_id, m.name): m.value
              for m in agg.store.metrics(agg.coordinator.federation_id)
              if m.name in (GPU_ENERGY, CPU_ENERGY)}  # fmt: skip
    assert stored == {(0, a.node_id, "gpu_energy_joules"): 1e12,
                      (0, a.node_id, "cpu_energy_joules"): 0.0,
                      (0, b.node_id, "cpu_energy_joules"): 812.5}  # fmt: skip


# ---- a real node's round ------------------------------------------------------------------------
class BurningPackage:
    """A RAPL package whose counter climbs by 1 mJ every millisecond or so, while in use."""

    def __init__(self, domain: Path) -> None:
        self.domain, self._stop = domain, threading.Event()
        self._thread = threading.Thread(target=self._burn, daemon=True)

    def _burn(self) -> None:
        while not self._stop.wait(0.001):
            set_uj(self.domain, get_uj(self.domain) + 1000)

    def __enter__(self) -> BurningPackage:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()


def one_round_aggregator(tmp_path: Path, start):
    return start(make_config(
        tmp_path,
        federation=FederationConfig(name="energy", rounds=1, inner_steps=2, delta_encoding="fp32",
                                    download_encoding="fp32"),
        round=RoundConfig(min_nodes=1, timeout_seconds=120.0, start_grace_seconds=0.1),
        train={"micro_batch_size": 2, "seq_len": 16, "warmup_steps": 1},
    ))  # fmt: skip


def run_node(agg, corpus: Path, work_dir: Path, powercap_root: Path) -> tuple[list, list[str]]:
    cfg = NodeConfig(aggregator=agg.address, organisation="acme", data=str(corpus),
                     work_dir=str(work_dir), insecure=True, score_global=False, poll_seconds=1.0,
                     powercap_root=str(powercap_root))  # fmt: skip
    said: list[str] = []
    records = Participant(cfg, DistEnv(), log=said.append).run()
    return records, said


def energy_rows(agg) -> dict:
    return {(m.round_number, m.name): m.value
            for m in agg.store.metrics(agg.coordinator.federation_id)
            if m.name in (GPU_ENERGY, CPU_ENERGY)}  # fmt: skip


def test_a_node_sends_the_energy_it_measured_and_the_aggregator_keeps_it(
    tmp_path: Path,
    serve,
    corpus_dir: Path,
    no_pynvml,
) -> None:
    agg = one_round_aggregator(tmp_path, serve)
    zones = powercap_tree(tmp_path / "powercap")
    with BurningPackage(zones["package-0"]):
        records, said = run_node(agg, corpus_dir, tmp_path / "node", tmp_path / "powercap")
    assert said[0].startswith("WARNING: connecting in plain text")
    assert said[1] == ("energy: GPU not measured (pynvml is not installed: pip install "
                       "'fedpt[gpu]'); CPU measured (2 CPU package(s))")  # fmt: skip
    (record,) = records
    assert record.pushed and record.gpu_energy_joules is None and record.cpu_energy_joules > 0
    assert energy_rows(agg) == {(0, "cpu_energy_joules"): record.cpu_energy_joules}
    logged = json.loads((tmp_path / "node" / "rounds.jsonl").read_text())
    assert logged["cpu_energy_joules"] == record.cpu_energy_joules


def test_a_node_with_nothing_measurable_sends_no_energy(
    tmp_path: Path,
    serve,
    corpus_dir: Path,
    no_pynvml,
) -> None:
    agg = one_round_aggregator(tmp_path, serve)
    records, said = run_node(agg, corpus_dir, tmp_path / "node", tmp_path / "absent")
    assert records[0].pushed
    assert (records[0].gpu_energy_joules, records[0].cpu_energy_joules) == (None, None)
    assert energy_rows(agg) == {}
    assert any(line.startswith("energy: GPU not measured") and "CPU not measured" in line
               for line in said)  # fmt: skip


class Died(BaseException):
    """The node's process ends here (a power cut between training and pushing)."""


def test_a_round_pushed_after_a_restart_sends_the_energy_measured_when_it_was_trained(
    tmp_path: Path,
    serve,
    corpus_dir: Path,
    no_pynvml,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    agg = one_round_aggregator(tmp_path, serve)
    zones = powercap_tree(tmp_path / "powercap")

    def dies(*_args, **_kwargs):
        raise Died

    with monkeypatch.context() as patch, BurningPackage(zones["package-0"]):
        patch.setattr(AggregatorClient, "push_payload", dies)
        with pytest.raises(Died):
            run_node(agg, corpus_dir, tmp_path / "node", tmp_path / "powercap")
    kept = read_state(latest_checkpoint(tmp_path / "node" / "checkpoints"))["extra"]
    assert kept["cpu_energy_joules"] > 0 and kept["gpu_energy_joules"] is None
    # The package is idle now: energy measured in this process would be 0 J.
    records, said = run_node(agg, corpus_dir, tmp_path / "node", tmp_path / "powercap")
    assert "round 0: pushing the update trained before the restart" in said
    assert records[0].pushed and records[0].cpu_energy_joules == kept["cpu_energy_joules"]
    assert energy_rows(agg) == {(0, "cpu_energy_joules"): kept["cpu_energy_joules"]}
