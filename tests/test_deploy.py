"""The deploy/ manifests keep the promises of docs/scaling.md: one GPU per worker, credentials only from
secrets, probes, a grace period longer than any micro-batch, KEDA watching the queue the workers consume,
and the same `sdbatch worker` command as the integration tests."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.fixtures_servers import worker_command
from worker.config import load_config
from worker.messages import queue_lists
from worker.metrics import metrics_port

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
IMAGE_WORKDIR = "/app/"  # WORKDIR of deploy/Dockerfile, where the repository's configs/ is copied
SYSTEMD_CONFIG = "/etc/sdbatch/sdbatch.yaml"
SYSTEMD_CONFIG_SOURCE = "configs/sd15-fp16.yaml"  # what the guide installs as SYSTEMD_CONFIG
REDIS_PASSWORD_REFERENCE = "${REDIS_PASSWORD:?set REDIS_PASSWORD in deploy/.env}"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|BASIC_AUTH")


def manifests() -> list[dict]:
    """Every document of every file kustomization.yaml applies."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((K8S / name).read_text())
            if doc]


def k8s(kind: str, name: str) -> dict:
    [found] = [doc for doc in manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def containers() -> list[dict]:
    return [c for doc in manifests() if doc["kind"] in ("Deployment", "StatefulSet")
            for c in doc["spec"]["template"]["spec"]["containers"]]


def repo_config(container_path: str):
    """The settings a container gets from a config path inside the image (env overrides aside)."""
    assert container_path.startswith(IMAGE_WORKDIR), container_path
    return load_config(REPO / container_path.removeprefix(IMAGE_WORKDIR), environ={})


def config_of(command: list[str]) -> str:
    return command[command.index("--config") + 1]


def seconds(duration: str) -> int:
    """A compose duration such as 2m, 90s or 1m30s."""
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts and duration, f"unreadable duration {duration!r}"
    return int(parts[1] or 0) * 60 + int(parts[2] or 0)


def test_every_manifest_and_the_compose_file_parse():
    documents = manifests()
    applied = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]

    assert sorted(applied) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert {doc["kind"] for doc in documents} >= {"Deployment", "StatefulSet", "Service", "ScaledObject",
                                                  "TriggerAuthentication", "ServiceMonitor"}
    assert all("apiVersion" in doc and "metadata" in doc for doc in documents)
    assert {"redis", "s3", "flower", "worker-cpu"} <= set(compose()["services"])


# --- Kubernetes ---------------------------------------------------------------------------------------------

def test_a_worker_pod_runs_the_tests_worker_command_on_exactly_one_gpu():
    pod = k8s("Deployment", "sdbatch-worker")["spec"]["template"]["spec"]
    [worker] = pod["containers"]
    gpu_containers = [c for c in containers() if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})]

    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu_containers == [worker]
    assert worker["command"] == worker_command(config_of(worker["command"]), "all")


def test_the_model_is_mounted_read_only_into_the_worker():
    pod = k8s("Deployment", "sdbatch-worker")["spec"]["template"]["spec"]
    [worker] = pod["containers"]
    [mount] = worker["volumeMounts"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    checkpoint = repo_config(config_of(worker["command"])).model.checkpoint

    assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["readOnly"] is True
    assert (IMAGE_WORKDIR + checkpoint).startswith(mount["mountPath"] + "/")


def test_the_grace_period_outlasts_the_longest_micro_batch():
    pod = k8s("Deployment", "sdbatch-worker")["spec"]["template"]["spec"]
    limits = repo_config(config_of(pod["containers"][0]["command"])).limits

    # batch_time_limit caps every batch's hard limit, and the soft limit sits below it (worker.messages)
    assert pod["terminationGracePeriodSeconds"] > limits.batch_time_limit


def test_keda_scales_the_worker_deployment_on_every_priority_list_of_its_queue_from_zero():
    scaled = k8s("ScaledObject", "sdbatch-worker")["spec"]
    [worker] = k8s("Deployment", "sdbatch-worker")["spec"]["template"]["spec"]["containers"]
    queue = repo_config(config_of(worker["command"])).broker.queue

    assert scaled["scaleTargetRef"]["name"] == "sdbatch-worker"
    assert scaled["minReplicaCount"] == 0
    assert [trigger["metadata"]["listName"] for trigger in scaled["triggers"]] == queue_lists(queue)
    for trigger in scaled["triggers"]:
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["address"].startswith(k8s("Service", "redis")["metadata"]["name"] + ".")


def test_every_long_running_container_has_liveness_and_readiness_probes():
    for container in containers():
        assert "livenessProbe" in container and "readinessProbe" in container, container["name"]


def test_kubernetes_credentials_come_only_from_secrets():
    assert not [doc for doc in manifests() if doc["kind"] == "Secret"]  # created by kubectl, never committed
    for container in containers():
        for variable in container.get("env", []):
            if SECRET_NAME.search(variable["name"]):
                assert "value" not in variable or _only_references(variable["value"], r"\$\(\w+\)"), variable
                assert "value" in variable or "secretKeyRef" in variable["valueFrom"], variable
            elif "value" in variable:
                assert _url_password(variable["value"]) in (None, "$(REDIS_PASSWORD)"), variable


def test_containers_running_worker_code_name_their_config_for_the_probes_too():
    for container in containers():
        command = container.get("command", [])
        if "worker.app" in command or command[:1] == ["sdbatch"]:
            env = {v["name"]: v.get("value") for v in container["env"]}
            if "--config" in command:
                assert env["SDBATCH_CONFIG"] == config_of(command), container["name"]
            repo_config(env["SDBATCH_CONFIG"])  # a config the image holds, and valid


def test_redis_keeps_the_queue_on_disk_and_never_evicts_it():
    [redis] = k8s("StatefulSet", "redis")["spec"]["template"]["spec"]["containers"]

    assert _flag(redis["args"], "--appendonly") == "yes"
    assert _flag(redis["args"], "--maxmemory-policy") == "noeviction"


def test_flower_requires_basic_auth_and_prometheus_scrapes_its_metrics():
    [flower] = k8s("Deployment", "flower")["spec"]["template"]["spec"]["containers"]
    [endpoint] = k8s("ServiceMonitor", "flower")["spec"]["endpoints"]
    service = k8s("Service", "flower")

    assert "FLOWER_BASIC_AUTH" in {v["name"] for v in flower["env"]}
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_worker_liveness_is_local_while_readiness_pings_through_the_broker():
    [worker] = k8s("Deployment", "sdbatch-worker")["spec"]["template"]["spec"]["containers"]
    env = {v["name"]: v["value"] for v in worker["env"] if "value" in v}
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}

    # an HTTP GET of this container's own metrics endpoint (no host: the pod's): no command, no broker
    timing = {"periodSeconds", "timeoutSeconds", "failureThreshold"}
    for probe in ("livenessProbe", "startupProbe"):
        assert set(worker[probe]) - timing == {"httpGet"}, probe
        assert worker[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, probe
    assert ports["metrics"] == metrics_port("0", env)  # the pod's one GPU is index 0 to its worker
    assert "inspect ping" in " ".join(worker["readinessProbe"]["exec"]["command"])


def test_prometheus_scrapes_the_metrics_port_of_every_worker_pod():
    pod = k8s("Deployment", "sdbatch-worker")["spec"]["template"]
    service = k8s("Service", "sdbatch-worker")
    monitor = k8s("ServiceMonitor", "sdbatch-worker")["spec"]
    [endpoint] = monitor["endpoints"]
    [port] = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]

    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert port["targetPort"] in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert endpoint["path"] == "/metrics"


# --- compose ------------------------------------------------------------------------------------------------

def test_the_compose_cpu_profile_runs_the_demo_config_with_the_tests_worker_command():
    worker = compose()["services"]["worker-cpu"]

    assert worker["profiles"] == ["cpu"]
    assert worker["command"] == worker_command(IMAGE_WORKDIR + "configs/demo.yaml", "cpu")
    assert repo_config(config_of(worker["command"])).model.checkpoint == "tiny-random"


def test_compose_gpu_workers_each_reserve_one_distinct_gpu_and_outlast_a_batch():
    gpu_workers = {name: s for name, s in compose()["services"].items() if "gpu" in s.get("profiles", [])}
    reserved = []
    for name, service in gpu_workers.items():
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        reserved += device["device_ids"]
        limits = repo_config(config_of(service["command"])).limits
        assert len(device["device_ids"]) == 1 and device["capabilities"] == ["gpu"], name
        assert service["command"] == worker_command(config_of(service["command"]), "all"), name
        assert seconds(service["stop_grace_period"]) > limits.batch_time_limit, name

    assert len(gpu_workers) >= 2 and len(set(reserved)) == len(reserved)


def test_the_compose_fleet_profile_routes_each_model_to_the_queue_its_workers_consume():
    fleet = [service for service in compose()["services"].values() if "fleet" in service.get("profiles", [])]
    configs = [repo_config(config_of(service["command"])) for service in fleet]
    served = {settings.model.name: settings.broker.queue for settings in configs}

    assert len(served) == len(fleet) == 2  # two models, one worker service each
    for settings in configs:  # each config enqueues for the whole fleet, on the queues its workers consume
        assert {name: route.queue for name, route in settings.models.items()} == served


def test_compose_workers_name_their_config_for_the_healthcheck_too():
    for name, service in compose()["services"].items():
        if service.get("command", [])[:2] == ["sdbatch", "worker"]:
            assert service["environment"]["SDBATCH_CONFIG"] == config_of(service["command"]), name


def test_compose_redis_has_aof_on_and_flower_has_auth():
    services = compose()["services"]

    assert "--appendonly yes" in " ".join(services["redis"]["command"])
    assert "FLOWER_BASIC_AUTH" in services["flower"]["environment"]


def test_compose_credentials_are_interpolated_never_written():
    for name, service in compose()["services"].items():
        for variable, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(variable):
                assert _only_references(value, r"\$\{\w+(:\?[^}]*)?\}"), (name, variable)
            assert _url_password(value) in (None, REDIS_PASSWORD_REFERENCE), name


def test_env_examples_hold_no_secret_values():
    for example in (DEPLOY / "compose.env.example", SYSTEMD / "sdbatch.env.example"):
        for line in example.read_text().splitlines():
            name, _, value = line.partition("=")
            if not line.startswith("#") and SECRET_NAME.search(name):
                assert value == "", (example.name, name)


# --- container image ----------------------------------------------------------------------------------------

def test_dockerfile_installs_the_project_and_runs_as_non_root_with_a_healthcheck():
    lines = _dockerfile_instructions()
    users = [args for op, args in lines if op == "USER"]
    workdir = [args for op, args in lines if op == "WORKDIR"]

    assert "cuda" in next(args for op, args in lines if op == "ARG" and "BASE_IMAGE" in args)
    assert ("RUN", 'pip install ".[worker,openvino]"') in lines and ("COPY", "pyproject.toml ./") in lines
    assert users and users[-1] not in ("root", "0")
    assert any(op == "HEALTHCHECK" and "inspect ping" in args for op, args in lines)
    assert workdir == [IMAGE_WORKDIR.rstrip("/")] and ("COPY", "configs ./configs") in lines


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", "", (DEPLOY / "Dockerfile").read_text())  # join continuation lines
    return [tuple(line.split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.startswith("#")]


# --- systemd ------------------------------------------------------------------------------------------------

def unit(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (SYSTEMD / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_systemd_worker_instance_is_the_gpu_index():
    worker = unit("sdbatch-worker@.service")
    [exec_start] = worker["ExecStart"]
    binary, *arguments = exec_start.split()

    assert ["sdbatch", *arguments] == worker_command(SYSTEMD_CONFIG, "%i")
    assert Path(binary).name == "sdbatch"
    assert "CUDA_VISIBLE_DEVICES=%i" in worker["Environment"]
    assert f"SDBATCH_CONFIG={SYSTEMD_CONFIG}" in worker["Environment"]
    assert worker["Restart"] == ["on-failure"] and worker["EnvironmentFile"]


def test_the_systemd_worker_stops_warm_within_a_timeout_longer_than_a_batch():
    worker = unit("sdbatch-worker@.service")
    limits = load_config(REPO / SYSTEMD_CONFIG_SOURCE, environ={}).limits
    guide = (SYSTEMD / "README.md").read_text()

    assert f"install -D -m 644 {SYSTEMD_CONFIG_SOURCE} {SYSTEMD_CONFIG}" in guide
    assert worker["KillMode"] == ["mixed"]  # SIGTERM to sdbatch alone: Celery's warm shutdown
    assert int(worker["TimeoutStopSec"][0]) > limits.batch_time_limit


def test_systemd_units_hold_no_credentials():
    for name in ("sdbatch-worker@.service", "sdbatch-flower.service"):
        settings = unit(name)
        assert not [e for e in settings.get("Environment", []) if SECRET_NAME.search(e.split("=")[0])], name
        assert settings["EnvironmentFile"] == ["/etc/sdbatch/sdbatch.env"], name


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_units_pass_systemd_analyze_verify(tmp_path):
    # verify also checks that ExecStart's binary exists: point it at stand-ins in place of the venv
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sdbatch", "celery"):
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)
    for name in ("sdbatch-worker@.service", "sdbatch-flower.service"):
        text = (SYSTEMD / name).read_text().replace("/opt/sdbatch/venv/bin/", f"{bin_dir}/")
        (tmp_path / name).write_text(text)

    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "sdbatch-worker@0.service"),
                             str(tmp_path / "sdbatch-flower.service")], capture_output=True, text=True)

    # a bad setting is reported and ignored with exit status 0: any output is a failure
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


# --- helpers ------------------------------------------------------------------------------------------------

def _only_references(value: str, reference: str) -> bool:
    """True when the value is made only of variable references (and separators), no literal secret."""
    return re.fullmatch(rf"(?:{reference}|[:@/])+", str(value)) is not None


def _url_password(value: object) -> str | None:
    match = re.match(r"\w+://[^:/@]*:(.+)@", str(value))
    return match[1] if match else None


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]
