"""The cluster path (issue 8): a real two-node Ray cluster started with `ray start` on this
machine, `cai-ray run configs/cluster-tiny.yaml` submitted with `ray job submit --working-dir .`,
polled until it succeeds, its run directory checked and the nodes its actors ran on read back
from the state API.

The test runs its own cluster: never the session's `ray_cluster` fixture, never `ray.init` in this
process. Every port is picked free, the cluster's files live under its own `--temp-dir` and it
has its own auth token, so a local Ray of another test cannot collide with it. `ray stop` would
stop every Ray on the machine, so the teardown kills only the processes whose command line names
this cluster's folder (its raylets, GCS, agents, workers and the job's driver).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: `ray`, `cai-ray` and `python` live here
RAY = str(BIN / "ray") if (BIN / "ray").is_file() else shutil.which("ray")
CONFIG = "configs/cluster-tiny.yaml"
CONSTITUTION = "constitutions/default.yaml"
STAGES = ("sl-generate", "sl-train", "rl-pairs", "rl-label", "pm-train", "rl-train")
EXCLUDES = ["/.venv", "/runs", "/.git", "/.pytest_cache", "/.ruff_cache"]
JOB_DEADLINE_S = 900  # the job takes 2-3 minutes on a quiet 2-core machine
NODE_PORTS = (
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(RAY is None, reason="the `ray` command line is not installed"),
]


def _free_ports(n: int) -> list[int]:
    """n distinct ports free right now (all held open together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalCluster:
    """A head node and a second node on this machine, each with its own resources."""

    def __init__(self, root: Path):
        self.root = root
        self.temp_dir = root / "ray"  # short: Ray's unix socket paths must stay under 108 bytes
        token = root / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            RAY_AUTH_MODE="token",  # every node and every CLI call reads this cluster's token
            RAY_AUTH_TOKEN_PATH=str(token),
            RAY_USAGE_STATS_ENABLED="0",
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # as an activated venv: `cai-ray`
        )
        self.env = env
        ports = _free_ports(3 + 2 * len(NODE_PORTS))
        self.gcs_port, self.dashboard_port, client_port = ports[:3]
        self.head_ports = dict(zip(NODE_PORTS, ports[3 : 3 + len(NODE_PORTS)], strict=True))
        self.worker_ports = dict(zip(NODE_PORTS, ports[3 + len(NODE_PORTS) :], strict=True))
        self.client_port = client_port
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"

    def ray(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        proc = subprocess.run(
            [RAY, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        out = proc.stdout + proc.stderr
        if check and proc.returncode != 0:
            raise AssertionError(f"ray {' '.join(args)} exited {proc.returncode}:\n{out[-4000:]}")
        return out

    def _node_args(self, ports: dict[str, int], resources: dict[str, float]) -> list[str]:
        args = [f"{flag}={port}" for flag, port in ports.items()]
        return [
            *args,
            "--num-cpus=2",
            "--num-gpus=0",
            f"--resources={json.dumps(resources)}",
            "--object-store-memory=200000000",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]

    def start(self) -> None:
        self.ray(
            "start",
            "--head",
            f"--port={self.gcs_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.client_port}",
            *self._node_args(self.head_ports, {"head": 1}),
            timeout=180,
        )
        self.ray(
            "start",
            f"--address=127.0.0.1:{self.gcs_port}",
            *self._node_args(self.worker_ports, {"worker_node": 1}),
            timeout=180,
        )
        deadline = time.monotonic() + 120
        while True:
            nodes = [n for n in self.nodes() if n["state"] == "ALIVE"]
            if len(nodes) == 2:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the cluster has {len(nodes)} alive nodes, not 2: {nodes}")
            time.sleep(2)

    def nodes(self) -> list[dict]:
        out = self.ray("list", "nodes", f"--address={self.dashboard}", "--detail", "--format=json")
        return _json_list(out)

    def actors(self) -> list[dict]:
        out = self.ray(
            "list",
            "actors",
            f"--address={self.dashboard}",
            "--detail",
            "--format=json",
            "--limit=10000",
        )
        return _json_list(out)

    def submit(self, submission_id: str, *entrypoint: str, resources: dict | None = None) -> None:
        args = [
            "job",
            "submit",
            f"--address={self.dashboard}",
            f"--submission-id={submission_id}",
            "--no-wait",
            "--working-dir=.",  # ray runs from ROOT: the checkout the test belongs to
            f"--runtime-env-json={json.dumps({'excludes': EXCLUDES})}",
        ]
        if resources:
            args.append(f"--entrypoint-resources={json.dumps(resources)}")
        self.ray(*args, "--", *entrypoint)

    def job(self, submission_id: str) -> dict:
        """The job's row in the state API: status, message, driver_info, ..."""
        out = self.ray("list", "jobs", f"--address={self.dashboard}", "--detail", "--format=json")
        rows = [j for j in _json_list(out) if j.get("submission_id") == submission_id]
        assert len(rows) == 1, f"job {submission_id} not listed:\n{out[-2000:]}"
        return rows[0]

    def logs(self, submission_id: str) -> str:
        return self.ray("job", "logs", submission_id, f"--address={self.dashboard}", check=False)

    def wait(self, submission_id: str, deadline_s: float) -> str:
        """Poll until the job ends; its logs. Fails with the logs unless it SUCCEEDED."""
        deadline = time.monotonic() + deadline_s
        job = self.job(submission_id)
        while job["status"] in ("PENDING", "RUNNING") and time.monotonic() < deadline:
            time.sleep(5)
            job = self.job(submission_id)
        logs = self.logs(submission_id)
        status = job["status"]
        if status != "SUCCEEDED":
            print(logs)  # pytest shows it with the failure
            print(self.ray("status", f"--address=127.0.0.1:{self.gcs_port}", check=False))
            raise AssertionError(
                f"job {submission_id} is {status} ({job.get('message')}):\n{logs[-6000:]}"
            )
        return logs

    def processes(self) -> list[int]:
        """Pids of every process whose command line names this cluster's folder."""
        mark, pids = str(self.root).encode(), []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if mark in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
        return pids

    def kill(self) -> None:
        """Stop this cluster only (`ray stop` would stop every Ray on the machine)."""
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 10), (signal.SIGKILL, 10)):
            pids = self.processes()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.5)
            if not self.processes():
                return


def _json_list(out: str) -> list[dict]:
    """The JSON list in a `ray list ... --format=json` output (warnings may come before it)."""
    start = out.find("[")
    data, _ = json.JSONDecoder().raw_decode(out[start:])
    return data


@pytest.fixture
def cluster():
    root = Path(tempfile.mkdtemp(prefix="cai-rc-", dir="/tmp"))
    c = LocalCluster(root)
    try:
        c.start()
        yield c
    finally:
        c.kill()
        left = c.processes()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"cluster processes still alive after the teardown: {left}"


def _manifest(run_dir: Path, stage: str) -> dict:
    path = run_dir / stage / "manifest.json"
    assert path.is_file(), f"{stage} wrote no manifest"
    manifest = json.loads(path.read_text())
    assert manifest["stage"] == stage and manifest["complete"] is True, manifest
    return manifest


def _rows(folder: Path) -> pd.DataFrame:
    shards = sorted(folder.glob("*.parquet"))
    assert shards, f"no Parquet shards in {folder}"
    return pd.concat([pd.read_parquet(s) for s in shards], ignore_index=True)


def test_ray_job_submit_runs_the_pipeline_on_two_nodes(cluster):
    t0 = time.monotonic()
    run_dir = cluster.root / "run"

    # The job runs on the cluster's Python from a copy of the working dir: `python -m cai_ray`
    # works there and imports the uploaded copy (first on sys.path), not the editable install.
    probe = "import cai_ray, os; print('CAI_RAY_AT', cai_ray.__file__); print('CWD', os.getcwd())"
    script = f'python -c "{probe}" && python -m cai_ray constitution validate {CONSTITUTION}'
    cluster.submit("probe", "bash", "-c", script)  # one argv: `ray job submit` shell-quotes each
    logs = cluster.wait("probe", 300)
    where = next(line for line in logs.splitlines() if line.startswith("CAI_RAY_AT"))
    cwd = next(line for line in logs.splitlines() if line.startswith("CWD")).split(" ", 1)[1]
    assert str(cluster.temp_dir) in cwd and "working_dir_files" in cwd, cwd
    assert where.split(" ", 1)[1].startswith(cwd), (where, cwd)
    assert f"OK {CONSTITUTION}" in logs, logs[-2000:]

    # The pipeline through rl-train, its driver pinned to the head by the custom resource.
    cluster.submit(
        "pipeline",
        "cai-ray",
        "run",
        CONFIG,
        "--set",
        f"run_dir={run_dir}",
        "--until",
        "rl-train",
        "--no-progress",
        resources={"head": 1},
    )
    logs = cluster.wait("pipeline", JOB_DEADLINE_S)
    driver_node = cluster.job("pipeline")["driver_node_id"]
    print(f"job done {time.monotonic() - t0:.0f}s after the cluster started")
    for stage in STAGES:
        assert f"{stage}: done" in logs, logs[-4000:]

    # The run directory: every stage complete, with the counts 4 prompts give.
    resolved = (run_dir / "config.yaml").read_text()
    assert "address: auto" in resolved
    outputs = {stage: _manifest(run_dir, stage)["outputs"] for stage in STAGES}
    red = outputs["sl-generate"]["red_team"]
    assert (red["rows"], red["rejects"], red["reject_reasons"]) == (4, 0, {})
    red_team = _rows(run_dir / "sl-generate" / "red_team")
    cut = sum(r[-1]["revision_finish"] == "length" for r in red_team["rounds"])
    assert red["cut_at_token_limit"]["final_revisions"] == cut  # what stage 2 drops or keeps
    assert outputs["sl-generate"]["helpful"]["rows"] == 4
    assert len(red_team) == 4 and red_team.prompt_id.is_unique
    assert all(len(r) == 1 for r in red_team["rounds"])  # one critique round in cluster-tiny
    assert outputs["sl-train"]["examples"] == 8 and outputs["sl-train"]["steps"] >= 1
    assert outputs["rl-pairs"]["red_team"]["rows"] == 4
    labels = _rows(run_dir / "rl-label" / "labels")
    assert len(labels) == 4 and labels.label.between(0, 1).all()
    assert outputs["pm-train"]["train_pairs"] + outputs["pm-train"]["held_out_pairs"] == 8
    assert outputs["rl-train"]["steps"] == 1 and outputs["rl-train"]["samples"] == 2
    for stage in ("sl-train", "pm-train", "rl-train"):
        assert (run_dir / stage / "hf" / "config.json").is_file(), stage

    # Both nodes took work: the DeepSpeed ranks (1.5 CPUs each on 2-CPU nodes) on different
    # nodes, so the ZeRO-3 collectives crossed raylets; the stage-1 rollout and critique pools
    # (1.5 CPUs each) likewise. The driver and the job's supervisor ran on the head.
    names = {}
    for node in cluster.nodes():
        resources = node.get("resources_total", {})
        names[node["node_id"]] = "head" if "head" in resources else "worker_node"
    assert sorted(names.values()) == ["head", "worker_node"], names
    placed: dict[str, set[str]] = {}
    for actor in cluster.actors():
        if actor.get("node_id") in names:
            placed.setdefault(actor["class_name"], set()).add(names[actor["node_id"]])
    print("actors by node:", json.dumps({k: sorted(v) for k, v in placed.items()}, indent=1))
    assert placed.get("LearnerWorker") == {"head", "worker_node"}, placed
    pools = ("MapWorker(MapBatches(RolloutWorker))", "MapWorker(MapBatches(CritiqueWorker))")
    assert set().union(*(placed.get(p, set()) for p in pools)) == {"head", "worker_node"}, placed
    assert names[driver_node] == "head"  # --entrypoint-resources '{"head": 1}'
    assert placed.get("JobSupervisor") == {"head"}, placed
