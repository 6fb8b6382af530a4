"""A real Flower deployment on 127.0.0.1 for tests and benchmarks: a SuperLink with TLS and
SuperNode authentication, SuperNodes registered by their public keys, `flwr run` of an app
folder, and every process stopped by pid (with the children Flower starts: flower-superexec,
flwr-serverapp, flwr-clientapp).

Flower 1.41 serves its Control, Fleet and ServerApp APIs on one HTTPS port; the `flwr` CLI finds
the SuperLink through a connection in $FLWR_HOME/config.toml; SuperNode keys are EC keys in
OpenSSH format, registered with `flwr supernode register`. Flower starts its app processes by
bare name, so this interpreter's bin folder leads PATH.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedpt.flower_simulation import FLOWER_OFFLINE
from fedpt.simulate import free_port
from protos import pki

CONNECTION = "fedpt-test"


class DeploymentError(RuntimeError):
    """A Flower process did not start or a run did not finish; the message has its log's tail."""


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`, from /proc (children first found, then theirs)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


class FlowerDeployment:
    """One SuperLink and any number of SuperNodes under `root` (`env`: more environment for
    every process, the apps' included); use as a context manager."""

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home = root / "flwr-home"
        self.home.mkdir(exist_ok=True)
        bin_dir = str(Path(sys.executable).parent)
        self.env = {**os.environ, **FLOWER_OFFLINE, "FLWR_HOME": str(self.home),
                    "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                    "PYTHONUNBUFFERED": "1", **(env or {})}  # fmt: skip
        self.processes: dict[str, subprocess.Popen] = {}
        self.seen: set[int] = set()  # every pid started, with its descendants, for stop()
        self.killed: list[int] = []
        self.tls = self._make_tls()
        self.address = ""

    def __enter__(self) -> FlowerDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- credentials ---------------------------------------------------------------------------
    def _make_tls(self) -> Path:
        """The SuperLink's TLS certificate (for 127.0.0.1) from a throwaway CA."""
        tls = self.root / "flower-tls"
        pki.init_ca(tls / "ca", "Flower SuperLink CA (test)")
        return pki.issue_kit(tls / "ca", "superlink", tls / "superlink", server_hosts=["127.0.0.1"])

    def supernode_key(self, name: str) -> tuple[Path, Path]:
        """An EC key pair in OpenSSH format, as SuperNode authentication wants it."""
        key = ec.generate_private_key(ec.SECP384R1())
        private, public = (
            self.root / "supernode-keys" / name,
            self.root / "supernode-keys" / f"{name}.pub",
        )
        private.parent.mkdir(exist_ok=True)
        private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))  # fmt: skip
        private.chmod(0o600)
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                         serialization.PublicFormat.OpenSSH) + b"\n")  # fmt: skip
        return private, public

    # ---- processes -----------------------------------------------------------------------------
    def _start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 (the child holds it)
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.root, start_new_session=True)  # fmt: skip
        log.close()
        self.processes[name] = proc
        self.seen.add(proc.pid)
        return proc

    def log_tail(self, name: str, lines: int = 30) -> str:
        text = (self.logs / f"{name}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def start_superlink(self, timeout: float = 120.0) -> str:
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        proc = self._start("superlink", [
            "flower-superlink", "--host", "127.0.0.1", "--port", str(port),
            "--ssl-ca-certfile", str(self.tls / pki.CA_CERT),
            "--ssl-certfile", str(self.tls / pki.NODE_CERT),
            "--ssl-keyfile", str(self.tls / pki.NODE_KEY),
            "--enable-supernode-auth",  # Flower's default state: in memory
            "--disable-runtime-dependency-installation",
        ])  # fmt: skip
        context = ssl.create_default_context(cafile=str(self.tls / pki.CA_CERT))
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            if proc.poll() is not None:
                raise DeploymentError(f"the SuperLink exited:\n{self.log_tail('superlink')}")
            try:
                with urllib.request.urlopen(f"https://{self.address}/health", context=context,
                                            timeout=5):  # fmt: skip
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise DeploymentError(f"the SuperLink was not healthy in {timeout:.0f} s")
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\nroot-certificates = "{self.tls / pki.CA_CERT}"\n'
        )
        return self.address

    def flwr(self, *args: str, timeout: float = 120.0) -> dict:
        """A `flwr` CLI command with --format json, against this SuperLink; its JSON answer."""
        proc = subprocess.run(["flwr", *args, "--format", "json"], capture_output=True,
                              text=True, env=self.env, cwd=self.root, timeout=timeout)  # fmt: skip
        out = proc.stdout
        try:
            answer = json.loads(out[out.index("{") :])
        except ValueError as e:
            raise DeploymentError(
                f"flwr {' '.join(args)}: no JSON answer:\n{out}\n{proc.stderr}"
            ) from e
        if not answer.get("success", False):
            raise DeploymentError(f"flwr {' '.join(args)} failed: {answer}")
        return answer

    def register(self, public_key: Path, name: str) -> None:
        self.flwr("supernode", "register", str(public_key), CONNECTION, "--name", name)

    def start_supernode(self, name: str, private_key: Path, node_config: dict) -> subprocess.Popen:
        config = " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items())
        return self._start(name, [
            "flower-supernode", "--superlink", self.address,
            "--root-certificates", str(self.tls / pki.CA_CERT),
            "--auth-supernode-private-key", str(private_key),
            "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", config,
        ])  # fmt: skip

    def wait_connected(self, name: str, timeout: float = 120.0) -> None:
        """Until the SuperNode `name` has activated with the SuperLink."""
        give_up = time.monotonic() + timeout
        while "SuperNode ID:" not in (self.logs / f"{name}.log").read_text(errors="replace"):
            if self.processes[name].poll() is not None:
                raise DeploymentError(f"SuperNode {name} exited:\n{self.log_tail(name)}")
            if time.monotonic() > give_up:
                raise DeploymentError(f"SuperNode {name} did not connect:\n{self.log_tail(name)}")
            time.sleep(0.5)

    def run_app(self, app: Path, run_config: dict) -> str:
        """`flwr run` the app folder; its run id (the run goes on in the SuperLink)."""
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        return str(self.flwr("run", str(app), CONNECTION, "--run-config", overrides)["run-id"])

    def wait_finished(self, run_id: str, timeout: float) -> dict:
        """Until the run has finished (`flwr ls` status finished:*); its row."""
        give_up = time.monotonic() + timeout
        while True:
            row = self.flwr("ls", CONNECTION, "--run-id", run_id)["runs"][0]
            if str(row["status"]).startswith("finished"):
                return row
            if time.monotonic() > give_up:
                raise DeploymentError(f"run {run_id} did not finish in {timeout:.0f} s: {row}")
            for name, proc in self.processes.items():
                if proc.poll() is not None and name == "superlink":
                    raise DeploymentError(f"the SuperLink exited:\n{self.log_tail(name)}")
            time.sleep(2.0)

    def run_log(self, run_id: str) -> str:
        """The ServerApp's output, as the SuperLink kept it."""
        proc = subprocess.run(["flwr", "log", run_id, CONNECTION, "--show"], capture_output=True,
                              text=True, env=self.env, cwd=self.root, timeout=120)  # fmt: skip
        return proc.stdout + proc.stderr

    def pids(self) -> list[int]:
        """Every live process of the deployment (those started and their descendants)."""
        for pid in list(self.seen):
            self.seen.update(descendants(pid))
        return sorted(pid for pid in self.seen if alive(pid))

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM every process of the deployment, SuperNodes before the SuperLink, then
        SIGKILL what is left after `grace` seconds; reaps the children started here."""
        self.pids()  # remember the descendants while their parents still live
        order = [n for n in self.processes if n != "superlink"] + ["superlink"]
        for name in order:
            proc = self.processes.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        self._wait_gone(grace)
        self.killed = self.pids()  # what SIGTERM did not stop (for a failing test's message)
        for pid in self.killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self._wait_gone(10.0)  # a killed orphan is gone once init has reaped it

    def _wait_gone(self, seconds: float) -> None:
        give_up = time.monotonic() + seconds
        while self.pids() and time.monotonic() < give_up:
            time.sleep(0.2)
