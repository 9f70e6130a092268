"""The Helm chart in charts/gantry, checked the way a cluster would see it.

Helm's own Go engine (helm-python-sdk) lints and renders the chart with the default values
and with every value set in tests/chart/values/; every rendered object is validated against
the strict Kubernetes schemas (kubernetes-validate, offline) of each Kubernetes version the
chart declares; then the properties an operator relies on are asserted: probes on the right
port, secrets never inlined, SQLite never run twice, non-root containers, labels, NOTES.
"""

from __future__ import annotations

import base64
import functools
import json
import re
from pathlib import Path
from typing import Any, Iterator

import helm_python
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "gantry"
VALUE_SETS_DIR = Path(__file__).resolve().parent / "values"
RELEASE = "demo"
NAMESPACE = "jobs"
FULLNAME = f"{RELEASE}-gantry"

# "default" is the chart's own values; the rest are files in tests/chart/values/.
VALUE_SETS = ["default"] + sorted(p.stem for p in VALUE_SETS_DIR.glob("*.yaml"))

CHART_META = yaml.safe_load((CHART / "Chart.yaml").read_text())
KUBE_VERSIONS = [
    v.strip() for v in CHART_META["annotations"]["validated-kubernetes-versions"].split(",")
]

GANTRY_CONTAINERS = {"server", "runner"}
PRIVILEGED_EXEMPT = {"dind"}


# --- Rendering --------------------------------------------------------------------------


def value_set(name: str) -> dict[str, Any]:
    if name == "default":
        return {}
    return yaml.safe_load((VALUE_SETS_DIR / f"{name}.yaml").read_text()) or {}


def render(values: dict[str, Any], name: str = RELEASE) -> dict[str, str]:
    """Template path -> rendered text, through Helm's engine (schema checked first)."""
    with helm_python.Chart.load(CHART) as chart:
        return chart.render(values=values, name=name, namespace=NAMESPACE)


@functools.lru_cache(maxsize=None)
def rendered_set(name: str) -> dict[str, str]:
    return render(value_set(name))


def objects_of(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def objects(name: str) -> list[dict[str, Any]]:
    return objects_of(rendered_set(name))


def notes(name: str) -> str:
    return next(text for path, text in rendered_set(name).items() if path.endswith("NOTES.txt"))


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def kinds(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def server(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return find(docs, "Deployment", f"{FULLNAME}-server")


def runner(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return find(docs, "Deployment", f"{FULLNAME}-runner")


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pod_spec(deployment)
    every = spec.get("containers", []) + spec.get("initContainers", [])
    return next(c for c in every if c["name"] == name)


def all_containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(deployment)
    return spec.get("initContainers", []) + spec["containers"]


def env(c: dict[str, Any]) -> dict[str, Any]:
    """Name -> value (a string) or valueFrom (a dict)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def pod_templates(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for d in docs:
        if d["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield d["spec"]["template"]


def refused(values: dict[str, Any]) -> str:
    """The error Helm gives for values the chart refuses (schema or template `fail`)."""
    with pytest.raises(helm_python.HelmError) as caught:
        render(values)
    return str(caught.value)


# --- Lint and schema validation -----------------------------------------------------------


@pytest.mark.parametrize("kube_version", [KUBE_VERSIONS[0], KUBE_VERSIONS[-1]])
@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint_finds_no_errors_or_warnings(name: str, kube_version: str) -> None:
    report = helm_python.lint(
        CHART, values=value_set(name), strict=True, namespace=NAMESPACE,
        kube_version=f"v{kube_version}.0",
    )
    assert report["errors"] == [], report
    serious = [m for m in report["messages"] if m["severity"] >= 2]
    assert serious == [], serious


def test_validated_versions_are_shipped_and_match_chart_kube_version() -> None:
    shipped = {".".join(v.split(".")[:2]) for v in all_versions()}
    assert set(KUBE_VERSIONS) <= shipped, f"kubernetes-validate ships {sorted(shipped)}"
    # kubeVersion's floor is the oldest validated version; no validated version is below it.
    floor = re.fullmatch(r">=\s*(\d+)\.(\d+)\.0-0", CHART_META["kubeVersion"])
    assert floor, CHART_META["kubeVersion"]
    assert KUBE_VERSIONS[0] == f"{floor.group(1)}.{floor.group(2)}"
    minors = [int(v.split(".")[1]) for v in KUBE_VERSIONS]
    assert minors == list(range(minors[0], minors[-1] + 1)), "validated versions have a gap"


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_manifest_validates_strictly(name: str, kube_version: str) -> None:
    docs = objects(name)
    assert docs
    for doc in docs:
        what = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{what} is invalid for Kubernetes {kube_version}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(f"{what}: {e.message}")


# --- The values schema ----------------------------------------------------------------------


def schema_nodes(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield path, node
        for key, child in node.items():
            yield from schema_nodes(child, f"{path}/{key}")
    elif isinstance(node, list):
        for n, child in enumerate(node):
            yield from schema_nodes(child, f"{path}/{n}")


def test_schema_closes_every_object() -> None:
    """Every object declares additionalProperties; only Kubernetes pass-through objects
    (checked by the API server) and free-form string maps accept unknown keys."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    for path, node in schema_nodes(schema):
        if node.get("type") != "object":
            continue
        assert "additionalProperties" in node, f"{path} does not say which keys it accepts"
        extra = node["additionalProperties"]
        if extra is True:
            assert node.get("$comment", "").startswith("Kubernetes object"), path
        elif extra is not False:
            assert isinstance(extra, dict) and ("type" in extra or "$ref" in extra), path


def test_every_value_the_schema_knows_is_in_values_yaml() -> None:
    """values.yaml shows (and documents) every setting: no value exists only in the schema."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = []

    def walk(node: dict[str, Any], values: Any, path: str) -> None:
        for key, child in node.get("properties", {}).items():
            if key == "global":
                continue
            if not isinstance(values, dict) or key not in values:
                missing.append(f"{path}{key}")
            elif child.get("type") == "object" and "properties" in child:
                walk(child, values[key], f"{path}{key}.")

    walk(schema, defaults, "")
    assert missing == [], f"in the schema but not in values.yaml: {missing}"


def test_every_value_in_values_yaml_has_a_comment() -> None:
    """Each value the chart defines (not the contents of a default resources block) has a
    comment line right above it (or above its block)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    missing = []
    for n, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parents = [k for _, k in stack]
        stack.append((indent, key))
        if "resources" in parents:
            continue
        previous = lines[n - 1].strip() if n else ""
        if not previous.startswith("#"):
            missing.append(".".join(parents + [key]))
    assert missing == [], f"values without a comment: {missing}"


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"sever": {"replicas": 1}}, "sever"),
        ({"server": {"replica": 2}}, "replica"),
        ({"runner": {"docker": {"dind": {"sokcetGroup": 5}}}}, "sokcetGroup"),
        ({"server": {"replicas": 0}}, "/server/replicas"),
        ({"server": {"replicas": "3"}}, "/server/replicas"),
        ({"runner": {"capacity": 0}}, "/runner/capacity"),
        ({"runner": {"capacity": 1025}}, "/runner/capacity"),
        ({"runner": {"executors": ["vm"]}}, "/runner/executors"),
        ({"runner": {"docker": {"mode": "podman"}}}, "/runner/docker/mode"),
        ({"runner": {"labels": {"a,b": "c"}}}, "/runner/labels"),
        ({"runner": {"labels": {"gpu": "a100,h100"}}}, "/runner/labels/gpu"),
        ({"database": {"type": "mysql"}}, "/database/type"),
        ({"database": {"postgresql": {"url": "mysql://x"}}}, "/database/postgresql/url"),
        ({"securityContext": {"runAsUser": 0}}, "/securityContext/runAsUser"),
        ({"server": {"leaseSeconds": 0}}, "/server/leaseSeconds"),
        ({"server": {"service": {"type": "ExternalName"}}}, "/server/service/type"),
        ({"auth": {"apiTokens": ["a,b"]}}, "/auth/apiTokens"),
        ({"server": {"resources": {"requests": {"memory": "lots"}}}}, "/server/resources"),
        (
            {"database": {"sqlite": {"persistence": {"accessModes": ["ReadWriteMany"]}}}},
            "/database/sqlite/persistence/accessModes",
        ),
    ],
)
def test_schema_rejects_typos_and_bad_values(values: dict[str, Any], needle: str) -> None:
    message = refused(values)
    assert "schema" in message, message
    assert needle in message, message


# --- Rules the templates enforce --------------------------------------------------------------


def test_sqlite_with_two_server_replicas_is_refused() -> None:
    message = refused({"server": {"replicas": 2}})
    assert "server.replicas is 2" in message, message
    assert 'database.type is "sqlite"' in message, message
    assert "exactly one server" in message, message
    assert "database.type: postgresql" in message, message


@pytest.mark.parametrize(
    ("values", "needles"),
    [
        ({"database": {"type": "postgresql"}},
         ["database.postgresql.url", "database.postgresql.existingSecret"]),
        ({"tls": {"enabled": True}}, ["tls.secretName"]),
        ({"runner": {"docker": {"mode": "none"}}}, ["runner.docker.mode", "executors"]),
    ],
)
def test_inconsistent_values_are_refused_by_name(values: dict[str, Any], needles: list[str]) -> None:
    message = refused(values)
    for needle in needles:
        assert needle in message, message


def test_process_only_runner_needs_no_engine() -> None:
    docs = objects_of(render({"runner": {"executors": ["process"], "docker": {"mode": "none"}}}))
    r = runner(docs)
    assert [c["name"] for c in all_containers(r)] == ["runner"]
    assert "DOCKER_HOST" not in env(container(r, "runner"))
    assert "supplementalGroups" not in pod_spec(r)["securityContext"]


# --- Labels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_object_and_pod_has_the_standard_labels(name: str) -> None:
    docs = objects(name)
    expected = {
        "app.kubernetes.io/name": "gantry",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/version": CHART_META["appVersion"],
        "app.kubernetes.io/managed-by": "Helm",
        "app.kubernetes.io/part-of": "gantry",
        "helm.sh/chart": f"gantry-{CHART_META['version']}",
    }
    labelled = [(f"{d['kind']}/{d['metadata']['name']}", d["metadata"]) for d in docs]
    labelled += [(f"pod template {t['metadata']['labels'].get('app.kubernetes.io/component')}",
                  t["metadata"]) for t in pod_templates(docs)]
    for what, meta in labelled:
        labels = meta.get("labels", {})
        for key, value in expected.items():
            assert labels.get(key) == value, f"{what}: {key}={labels.get(key)!r}"
    for d in kinds(docs, "Deployment"):
        selector = d["spec"]["selector"]["matchLabels"]
        component = selector["app.kubernetes.io/component"]
        assert d["metadata"]["labels"]["app.kubernetes.io/component"] == component
        template_labels = d["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= template_labels.items()
        # The selector holds only labels that never change across upgrades.
        assert set(selector) == {"app.kubernetes.io/name", "app.kubernetes.io/instance",
                                 "app.kubernetes.io/component"}


# --- Probes ---------------------------------------------------------------------------------


def probe_ports(c: dict[str, Any]) -> dict[str, tuple[int, str]]:
    return {kind: (c[kind]["grpc"]["port"], c[kind]["grpc"].get("service", ""))
            for kind in ("startupProbe", "livenessProbe", "readinessProbe")}


def named_port(c: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name)


@pytest.mark.parametrize("name", [n for n in VALUE_SETS if n != "tls"])
def test_probes_hit_the_grpc_port_without_tls(name: str) -> None:
    c = container(server(objects(name)), "server")
    grpc = named_port(c, "grpc")
    assert grpc == 50051
    assert env(c)["GANTRY_LISTEN"] == "0.0.0.0:50051"
    assert "GANTRY_HEALTH_LISTEN" not in env(c)
    assert [p["name"] for p in c["ports"]] == ["grpc"]
    assert probe_ports(c) == {
        "startupProbe": (grpc, "liveness"),
        "livenessProbe": (grpc, "liveness"),
        "readinessProbe": (grpc, ""),
    }
    assert not any("exec" in c[k] or "httpGet" in c[k] for k in probe_ports(c))


def test_probes_hit_the_plaintext_health_port_with_tls() -> None:
    c = container(server(objects("tls")), "server")
    health = named_port(c, "health")
    assert health == 8081 and named_port(c, "grpc") == 50051
    assert env(c)["GANTRY_HEALTH_LISTEN"] == "0.0.0.0:8081"
    assert probe_ports(c) == {
        "startupProbe": (health, "liveness"),
        "livenessProbe": (health, "liveness"),
        "readinessProbe": (health, ""),
    }


def test_runners_have_no_probes_and_no_ports() -> None:
    for name in ("default", "dind", "networkpolicy-hostpath"):
        c = container(runner(objects(name)), "runner")
        assert not {"ports", "livenessProbe", "readinessProbe", "startupProbe"} & set(c)


# --- Secrets --------------------------------------------------------------------------------


def test_existing_secrets_are_referenced_and_never_inlined() -> None:
    rendered = rendered_set("existing-secrets")
    text = "\n".join(rendered.values())
    # Not in clear, not in base64, not hashed into an annotation.
    for sentinel in ("SENTINEL-registration-token-in-values", "SENTINEL-api-token-in-values",
                     "SENTINEL-password", "SENTINEL"):
        assert sentinel not in text
        assert base64.b64encode(sentinel.encode()).decode()[:12] not in text
    docs = objects_of(rendered)
    assert kinds(docs, "Secret") == []
    assert "checksum/auth" not in server(docs)["spec"]["template"]["metadata"].get("annotations", {})
    e = env(container(server(docs), "server"))
    assert e["GANTRY_REGISTRATION_TOKEN"] == {"secretKeyRef": {"name": "ops-gantry-tokens", "key": "reg"}}
    assert e["GANTRY_API_TOKENS"] == {"secretKeyRef": {"name": "ops-gantry-tokens", "key": "api"}}
    assert e["GANTRY_DATABASE_URL"] == {"secretKeyRef": {"name": "ops-gantry-database", "key": "url"}}
    r = env(container(runner(docs), "runner"))
    assert r["GANTRY_REGISTRATION_TOKEN"] == {"secretKeyRef": {"name": "ops-gantry-tokens", "key": "reg"}}
    assert "GANTRY_API_TOKENS" not in r, "runners need no API token"
    assert "ops-gantry-tokens" in notes("existing-secrets")


def secret_data(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in find(docs, "Secret", name)["data"].items()}


def test_tokens_from_values_go_into_the_chart_secret_only() -> None:
    rendered = rendered_set("postgresql-3-replicas")
    docs = objects_of(rendered)
    assert secret_data(docs, f"{FULLNAME}-auth") == {
        "registration-token": "reg-token-from-values",
        "api-tokens": "api-token-one,api-token-two",
    }
    url = "postgres://gantry:pg-inline-password@postgres.databases.svc:5432/gantry"
    assert secret_data(docs, f"{FULLNAME}-database") == {"database-url": url}
    assert "pg-inline-password" not in "\n".join(rendered.values())  # only base64, in the Secret
    e = env(container(server(docs), "server"))
    assert e["GANTRY_DATABASE_URL"] == {"secretKeyRef": {"name": f"{FULLNAME}-database", "key": "database-url"}}
    for name in ("GANTRY_REGISTRATION_TOKEN", "GANTRY_API_TOKENS"):
        assert e[name]["secretKeyRef"]["name"] == f"{FULLNAME}-auth"


def test_empty_tokens_are_generated_and_read_back_on_upgrade() -> None:
    first = secret_data(objects("default"), f"{FULLNAME}-auth")
    again = secret_data(objects_of(render({})), f"{FULLNAME}-auth")
    for key in ("registration-token", "api-tokens"):
        assert re.fullmatch(r"[A-Za-z0-9]{40}", first[key]), first
        assert first[key] != again[key], "a render without a cluster generates fresh tokens"
    # On a cluster, an upgrade reads the installed Secret back instead.
    source = (CHART / "templates" / "secret-auth.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace $name' in source


# --- Security contexts ------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_container_runs_as_non_root_except_the_dind_sidecar(name: str) -> None:
    docs = objects(name)
    exempt_seen = []
    for d in kinds(docs, "Deployment"):
        pod = pod_spec(d)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        assert pod["enableServiceLinks"] is False
        for c in all_containers(d):
            sc = c["securityContext"]
            if c["name"] in PRIVILEGED_EXEMPT:
                exempt_seen.append(c["name"])
                assert sc["privileged"] is True, "dockerd needs a privileged container"
                continue
            assert c["name"] in GANTRY_CONTAINERS
            assert sc["runAsNonRoot"] is True, c["name"]
            assert sc["runAsUser"] != 0, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc.get("privileged", False) is False, c["name"]
            assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert "add" not in sc["capabilities"]
            assert "command" not in c, "the images' ENTRYPOINT runs the binary"
    dind = value_set(name).get("runner", {}).get("docker", {}).get("mode", "dind") == "dind"
    runners = value_set(name).get("runner", {}).get("enabled", True)
    assert exempt_seen == (["dind"] if dind and runners else [])


# --- SQLite and PostgreSQL ----------------------------------------------------------------------


def test_sqlite_gets_a_claim_a_single_replica_and_recreate() -> None:
    docs = objects("default")
    claim = find(docs, "PersistentVolumeClaim", f"{FULLNAME}-data")
    # One pod at a time mounts it: a replacement waits for the old server to be gone.
    assert claim["spec"]["accessModes"] == ["ReadWriteOncePod"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    s = server(docs)
    assert s["spec"]["replicas"] == 1
    assert s["spec"]["strategy"] == {"type": "Recreate"}
    c = container(s, "server")
    assert env(c)["GANTRY_DATABASE_URL"] == "sqlite:///var/lib/gantry/gantry.db?mode=rwc"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["data"] == "/var/lib/gantry"
    volumes = {v["name"]: v for v in pod_spec(s)["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": f"{FULLNAME}-data"}
    assert pod_spec(s)["securityContext"]["fsGroup"] == 65532


def test_sqlite_on_an_existing_claim_creates_none() -> None:
    docs = objects("server-only")
    assert kinds(docs, "PersistentVolumeClaim") == []
    volumes = {v["name"]: v for v in pod_spec(server(docs))["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "gantry-data-old"}
    assert server(docs)["spec"]["strategy"]["type"] == "Recreate"


@pytest.mark.parametrize("name", ["postgresql-3-replicas", "existing-secrets"])
def test_postgresql_has_no_claim_and_rolls(name: str) -> None:
    docs = objects(name)
    assert kinds(docs, "PersistentVolumeClaim") == []
    s = server(docs)
    assert s["spec"]["replicas"] == value_set(name)["server"]["replicas"]
    assert s["spec"]["strategy"]["type"] == "RollingUpdate"
    assert s["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "data" not in {v["name"] for v in pod_spec(s)["volumes"]}


def test_numbers_reach_the_environment_as_plain_integers() -> None:
    e = env(container(server(objects("postgresql-3-replicas")), "server"))
    assert e["GANTRY_RETENTION_SECONDS"] == "2592000"
    assert e["GANTRY_LEASE_SECONDS"] == "30"
    assert e["GANTRY_DEFAULT_TIMEOUT_SECONDS"] == "3600"
    assert e["GANTRY_SHUTDOWN_GRACE_SECONDS"] == "10"


def test_topology_spread_defaults_to_the_component_pods() -> None:
    s = server(objects("postgresql-3-replicas"))
    (constraint,) = pod_spec(s)["topologySpreadConstraints"]
    assert constraint["labelSelector"]["matchLabels"] == s["spec"]["selector"]["matchLabels"]


# --- Disruption budgets -----------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_disruption_budgets_cover_both_components_and_never_block_drains(name: str) -> None:
    docs = objects(name)
    budgets = {p["metadata"]["name"]: p for p in kinds(docs, "PodDisruptionBudget")}
    deployments = {d["metadata"]["name"]: d for d in kinds(docs, "Deployment")}
    assert set(budgets) == set(deployments)
    for pdb_name, pdb in budgets.items():
        assert "minAvailable" not in pdb["spec"]
        assert pdb["spec"]["selector"] == deployments[pdb_name]["spec"]["selector"]
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        max_unavailable = pdb["spec"]["maxUnavailable"]
        assert max_unavailable == 1 or (isinstance(max_unavailable, str) and max_unavailable != "0%")


def test_percentage_budget_stays_a_string() -> None:
    pdb = find(objects("postgresql-3-replicas"), "PodDisruptionBudget", f"{FULLNAME}-server")
    assert pdb["spec"]["maxUnavailable"] == "34%"


# --- Runners --------------------------------------------------------------------------------


def test_dind_runner_environment_and_sidecar() -> None:
    r = runner(objects("dind"))
    pod = pod_spec(r)
    assert r["spec"]["replicas"] == 3
    assert pod["terminationGracePeriodSeconds"] == 300 + 30
    e = env(container(r, "runner"))
    assert e["GANTRY_SERVER"] == f"http://{FULLNAME}-server:50051"
    assert e["GANTRY_RUNNER_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert e["GANTRY_RUNNER_LABELS"] == "arch=amd64"
    assert e["GANTRY_RUNNER_CAPACITY"] == "8"
    assert e["GANTRY_RUNNER_EXECUTORS"] == "docker,process"
    assert "GANTRY_RUNNER_QUEUES" not in e
    assert e["GANTRY_RUNNER_DRAIN_GRACE_SECONDS"] == "300"
    assert e["GANTRY_RUNNER_STATE_DIR"] == "/var/lib/gantry-runner"
    assert e["DOCKER_HOST"] == "unix:///var/run/dind/docker.sock"
    volumes = {v["name"]: v for v in pod["volumes"]}
    runner_mounts = {m["mountPath"]: m["name"] for m in container(r, "runner")["volumeMounts"]}
    assert "emptyDir" in volumes[runner_mounts["/var/lib/gantry-runner"]]
    assert "emptyDir" in volumes[runner_mounts["/tmp"]]
    assert pod["securityContext"]["supplementalGroups"] == [3000]

    # The sidecar: native (outlives the runner's drain), unix socket only, group 3000.
    (dind,) = pod["initContainers"]
    assert dind["name"] == "dind" and dind["restartPolicy"] == "Always"
    assert dind["image"] == "docker.io/library/docker:29-dind"
    assert dind["args"][0] == "dockerd", "an option first makes the entrypoint add tcp://0.0.0.0"
    assert "--host=unix:///var/run/dind/docker.sock" in dind["args"]
    assert "--group=3000" in dind["args"] and "--mtu=1450" in dind["args"]
    assert not any("tcp://" in a for a in dind["args"])
    assert "command" not in dind
    assert dind["startupProbe"]["exec"]["command"][-1] == "version"
    dind_mounts = {m["mountPath"]: m["name"] for m in dind["volumeMounts"]}
    assert dind_mounts["/var/run/dind"] == runner_mounts["/var/run/dind"]
    assert volumes[dind_mounts["/var/lib/docker"]]["emptyDir"] == {"sizeLimit": "20Gi"}
    assert dind["resources"]["requests"] == {"cpu": "1", "memory": "1Gi"}


def test_runner_labels_and_queues_are_comma_lists() -> None:
    e = env(container(runner(objects("postgresql-3-replicas")), "runner"))
    assert e["GANTRY_RUNNER_LABELS"] == "gpu=a100,zone=b"
    assert e["GANTRY_RUNNER_QUEUES"] == "default,gpu"
    assert e["GANTRY_RUNNER_EXECUTORS"] == "docker"
    assert e["GANTRY_RUNNER_CAPACITY"] == "2"


def test_hostpath_runner_uses_the_node_socket_and_its_group() -> None:
    r = runner(objects("networkpolicy-hostpath"))
    pod = pod_spec(r)
    assert "initContainers" not in pod
    assert pod["securityContext"]["supplementalGroups"] == [998]
    c = container(r, "runner")
    assert env(c)["DOCKER_HOST"] == "unix:///var/run/docker.sock"
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/var/run/docker.sock")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["hostPath"] == {"path": "/run/docker.sock", "type": "Socket"}
    assert pod["nodeSelector"] == {"gantry.example/docker": "true"}
    assert "the nodes' Docker socket /run/docker.sock" in notes("networkpolicy-hostpath")


def test_server_only_renders_no_runner_objects() -> None:
    docs = objects("server-only")
    assert [d for d in docs if d["metadata"]["labels"].get("app.kubernetes.io/component") == "runner"] == []
    s = server(docs)
    c = container(s, "server")
    assert c["image"] == "registry.example.com/gantry/gantry-server:0.1.1"
    assert pod_spec(s)["imagePullSecrets"] == [{"name": "regcred"}]
    assert env(c)["RUST_LOG"] == "debug" and env(c)["RUST_BACKTRACE"] == "1"
    service = find(docs, "Service", f"{FULLNAME}-server")
    assert service["spec"]["type"] == "NodePort"
    assert service["spec"]["ports"] == [{"name": "grpc", "port": 443, "targetPort": "grpc",
                                        "protocol": "TCP", "appProtocol": "kubernetes.io/h2c"}]
    assert "port-forward svc/demo-gantry-server 50051:443" in notes("server-only")


def test_default_images_follow_the_app_version() -> None:
    docs = objects("default")
    assert container(server(docs), "server")["image"] == f"gantry-server:{CHART_META['appVersion']}"
    assert container(runner(docs), "runner")["image"] == f"gantry-runner:{CHART_META['appVersion']}"
    assert container(server(docs), "server")["imagePullPolicy"] == "IfNotPresent"


def test_app_version_is_the_version_the_images_are_built_with() -> None:
    # scripts/images.sh tags the images with the workspace version.
    cargo = (ROOT / "Cargo.toml").read_text()
    version = re.search(r'^version = "([^"]+)"$', cargo, re.MULTILINE)
    assert version, "Cargo.toml names no workspace version"
    assert CHART_META["appVersion"] == version.group(1)


# --- TLS ------------------------------------------------------------------------------------


def test_tls_mounts_the_certificate_and_runners_trust_the_ca() -> None:
    docs = objects("tls")
    s = server(docs)
    c = container(s, "server")
    e = env(c)
    mount = next(m for m in c["volumeMounts"] if m["name"] == "tls")
    assert mount["readOnly"] is True
    volume = next(v for v in pod_spec(s)["volumes"] if v["name"] == "tls")
    assert volume["secret"]["secretName"] == "gantry-server-tls"
    files = {f"{mount['mountPath']}/{item['path']}" for item in volume["secret"]["items"]}
    assert {e["GANTRY_TLS_CERT"], e["GANTRY_TLS_KEY"]} == files
    service = find(docs, "Service", f"{FULLNAME}-server")
    assert "appProtocol" not in service["spec"]["ports"][0]

    r = runner(docs)
    rc = container(r, "runner")
    re_ = env(rc)
    assert re_["GANTRY_SERVER"] == f"https://{FULLNAME}-server:50051"
    assert re_["GANTRY_TLS_DOMAIN"] == "gantry.example.internal"
    ca_mount = next(m for m in rc["volumeMounts"] if m["name"] == "ca")
    ca_volume = next(v for v in pod_spec(r)["volumes"] if v["name"] == "ca")
    assert ca_volume["secret"]["secretName"] == "gantry-ca"
    assert ca_volume["secret"]["items"] == [{"key": "root.pem", "path": "ca.crt"}]
    assert re_["GANTRY_TLS_CA"] == f"{ca_mount['mountPath']}/ca.crt"


# --- NetworkPolicy --------------------------------------------------------------------------


def test_no_network_policy_by_default() -> None:
    assert kinds(objects("default"), "NetworkPolicy") == []


def test_network_policies_admit_runners_and_configured_clients_only() -> None:
    docs = objects("networkpolicy-hostpath")
    server_policy = find(docs, "NetworkPolicy", f"{FULLNAME}-server")
    runner_labels = runner(docs)["spec"]["selector"]["matchLabels"]
    assert server_policy["spec"]["podSelector"]["matchLabels"] == server(docs)["spec"]["selector"]["matchLabels"]
    assert server_policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = server_policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert rule["from"] == [
        {"podSelector": {"matchLabels": runner_labels}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ci"}}},
        {"podSelector": {"matchLabels": {"app": "gantry-client"}}},
    ]
    runner_policy = find(docs, "NetworkPolicy", f"{FULLNAME}-runner")
    assert runner_policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert runner_policy["spec"]["ingress"] == []
    egress = runner_policy["spec"]["egress"]
    assert {"port": 53, "protocol": "UDP"} in egress[0]["ports"] and "to" not in egress[0]
    assert egress[1]["to"] == [{"podSelector": {"matchLabels": server(docs)["spec"]["selector"]["matchLabels"]}}]
    assert egress[2]["to"] == [{"ipBlock": {"cidr": "10.0.0.0/8"}}]


def test_network_policy_with_tls_opens_only_the_health_port_to_all() -> None:
    docs = objects("tls")
    policy = find(docs, "NetworkPolicy", f"{FULLNAME}-server")
    grpc_rule, health_rule = policy["spec"]["ingress"]
    assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}] and grpc_rule["from"]
    assert health_rule == {"ports": [{"port": "health", "protocol": "TCP"}]}
    runner_policy = find(docs, "NetworkPolicy", f"{FULLNAME}-runner")
    assert runner_policy["spec"]["policyTypes"] == ["Ingress"], "runner egress is open by default"


# --- NOTES ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_notes_tell_how_to_reach_the_server(name: str) -> None:
    text = notes(name)
    values = value_set(name)
    port = values.get("server", {}).get("service", {}).get("port", 50051)
    secret = values.get("auth", {}).get("existingSecret") or f"{FULLNAME}-auth"
    key = values.get("auth", {}).get("apiTokensKey", "api-tokens")
    assert f"kubectl --namespace {NAMESPACE} port-forward svc/{FULLNAME}-server 50051:{port}" in text
    assert f"get secret {secret}" in text and f"{{.data.{key}}}" in text
    assert "gantry submit --wait --image alpine -- echo hi" in text
    assert '-H "authorization: Bearer $GANTRY_TOKEN"' in text
    assert "{{" not in text and "<no value>" not in text
    if values.get("tls", {}).get("enabled"):
        cert_name = values["tls"].get("serverName") or f"{FULLNAME}-server"
        assert "GANTRY_SERVER=https://127.0.0.1:50051" in text
        assert "GANTRY_TLS_CA" in text
        assert f"GANTRY_TLS_DOMAIN={cert_name}" in text
        assert "gantry jobs" in text
        assert f"grpcurl -cacert gantry-ca.crt -servername {cert_name} 127.0.0.1:50051 list" in text
        assert "get secret gantry-ca" in text and "{.data.root\\.pem}" in text
        assert "-plaintext" not in text
    else:
        assert "gantry --server http://127.0.0.1:50051 --token \"$GANTRY_TOKEN\" jobs" in text
        assert "grpcurl -plaintext 127.0.0.1:50051 list" in text


def test_release_names_containing_gantry_are_not_doubled() -> None:
    docs = objects_of(render({}, name="gantry"))
    assert {d["metadata"]["name"] for d in kinds(docs, "Deployment")} == {"gantry-server", "gantry-runner"}
