"""The Helm chart in charts/gantry, checked the way a cluster would see it.

Helm's own Go engine (helm-python-sdk) lints and renders the chart with the default values
and with every value set in tests/chart/values/; every rendered object is validated against
the strict Kubernetes schemas (kubernetes-validate, offline) of each Kubernetes version the
chart declares; then the properties an operator relies on are asserted: probes on the right
port, secrets never inlined, SQLite and a local blob store never used by two servers, job
sockets where the Docker engine finds them, non-root containers, labels, NOTES.
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


def assert_valid(docs: list[dict[str, Any]], kube_version: str) -> None:
    """Every object passes the strict schemas of that Kubernetes version."""
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


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_manifest_validates_strictly(name: str, kube_version: str) -> None:
    assert_valid(objects(name), kube_version)


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
        ({"blobs": {"type": "gcs"}}, "/blobs/type"),
        ({"blobs": {"s3": {"acessKeyId": "x"}}}, "acessKeyId"),
        ({"blobs": {"s3": {"bucket": "My_Bucket"}}}, "/blobs/s3/bucket"),
        ({"blobs": {"s3": {"endpoint": "minio:9000"}}}, "/blobs/s3/endpoint"),
        ({"blobs": {"s3": {"region": ""}}}, "/blobs/s3/region"),
        ({"blobs": {"s3": {"accessKeyIdKey": "a key"}}}, "/blobs/s3/accessKeyIdKey"),
        ({"blobs": {"maxResultBytes": 16 * 1024 * 1024 + 1}}, "/blobs/maxResultBytes"),
        ({"blobs": {"maxArtifactBytes": -1}}, "/blobs/maxArtifactBytes"),
        ({"blobs": {"maxArtifactsPerJob": "1000"}}, "/blobs/maxArtifactsPerJob"),
        ({"blobs": {"blobGraceSeconds": 1.5}}, "/blobs/blobGraceSeconds"),
        (
            # A shared volume does not make a local store safe for several servers.
            {"blobs": {"local": {"persistence": {"accessModes": ["ReadWriteMany"]}}}},
            "/blobs/local/persistence/accessModes",
        ),
        ({"runner": {"docker": {"stateDir": "var/lib/gantry-runner"}}}, "/runner/docker/stateDir"),
        ({"runner": {"docker": {"stateDir": "/srv/" + "x" * 28}}}, "/runner/docker/stateDir"),
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


POSTGRESQL = {"type": "postgresql", "postgresql": {"url": "postgres://g:pw@db:5432/gantry"}}


@pytest.mark.parametrize("persistence", [{}, {"enabled": False}, {"existingClaim": "shared"}])
def test_a_local_blob_store_with_two_server_replicas_is_refused(persistence: dict[str, Any]) -> None:
    message = refused({"database": POSTGRESQL, "server": {"replicas": 2},
                       "blobs": {"local": {"persistence": persistence}}})
    assert "server.replicas is 2" in message, message
    assert 'blobs.type is "local"' in message, message
    assert "exactly one server" in message, message
    assert "blobs.type: s3" in message, message


@pytest.mark.parametrize(
    ("values", "needles"),
    [
        ({"database": {"type": "postgresql"}},
         ["database.postgresql.url", "database.postgresql.existingSecret"]),
        ({"blobs": {"type": "s3", "s3": {"existingSecret": "s3-creds"}}}, ["blobs.s3.bucket"]),
        ({"blobs": {"type": "s3", "s3": {"bucket": "bkt"}}},
         ["blobs.s3.existingSecret", "blobs.s3.accessKeyId", "blobs.s3.secretAccessKey"]),
        ({"blobs": {"type": "s3", "s3": {"bucket": "bkt", "accessKeyId": "AKIA0"}}},
         ["blobs.s3.secretAccessKey"]),
        # The server's message limit (4 MiB by default) must hold a result and 4 KiB more.
        ({"blobs": {"maxResultBytes": 4 * 1024 * 1024}},
         ["blobs.maxResultBytes is 4194304", "GANTRY_MAX_MESSAGE_BYTES", "at most 4190208"]),
        ({"blobs": {"maxResultBytes": 8 * 1024 * 1024},
          "server": {"extraEnv": [{"name": "GANTRY_MAX_MESSAGE_BYTES", "value": "8388608"}]}},
         ["blobs.maxResultBytes is 8388608", "is 8388608", "at most 8384512"]),
        ({"tls": {"enabled": True}}, ["tls.secretName"]),
        ({"runner": {"docker": {"mode": "none"}}}, ["runner.docker.mode", "executors"]),
    ],
)
def test_inconsistent_values_are_refused_by_name(values: dict[str, Any], needles: list[str]) -> None:
    message = refused(values)
    for needle in needles:
        assert needle in message, message


def test_result_limit_checks_stop_where_the_chart_cannot_see_the_message_limit() -> None:
    # Just within the default message limit; a limit from a Secret is not checked.
    render({"blobs": {"maxResultBytes": 4 * 1024 * 1024 - 4096}})
    from_secret = {"name": "GANTRY_MAX_MESSAGE_BYTES",
                   "valueFrom": {"secretKeyRef": {"name": "limits", "key": "message"}}}
    render({"blobs": {"maxResultBytes": 16 * 1024 * 1024}, "server": {"extraEnv": [from_secret]}})


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
                     "SENTINEL-password", "SENTINEL-s3-key-id", "SENTINEL-s3-secret", "SENTINEL"):
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


# --- Blobs (artifacts and uploaded inputs) ----------------------------------------------------


def blob_env(e: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in e.items() if k.startswith(("GANTRY_S3_", "GANTRY_BLOB_DIR"))}


def test_sqlite_keeps_local_blobs_beside_the_database() -> None:
    """Where gantry-server puts them by default: <database file>.blobs, on the database's
    claim; no second volume, no S3 settings."""
    docs = objects("default")
    s = server(docs)
    c = container(s, "server")
    e = env(c)
    assert blob_env(e) == {"GANTRY_BLOB_DIR": "/var/lib/gantry/gantry.db.blobs"}
    database_file = e["GANTRY_DATABASE_URL"].removeprefix("sqlite://").split("?")[0]
    assert e["GANTRY_BLOB_DIR"] == f"{database_file}.blobs"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert e["GANTRY_BLOB_DIR"].startswith("/var/lib/gantry/") and mounts["/var/lib/gantry"] == "data"
    assert {v["name"] for v in pod_spec(s)["volumes"]} == {"tmp", "data"}
    assert [p["metadata"]["name"] for p in kinds(docs, "PersistentVolumeClaim")] == [f"{FULLNAME}-data"]
    assert [x["metadata"]["name"] for x in kinds(docs, "Secret")] == [f"{FULLNAME}-auth"]
    assert s["spec"]["strategy"] == {"type": "Recreate"}
    # The server's defaults, passed as plain integers.
    assert e["GANTRY_MAX_RESULT_BYTES"] == "1048576"
    assert e["GANTRY_MAX_ARTIFACT_BYTES"] == "5368709120"
    assert e["GANTRY_MAX_ARTIFACTS_PER_JOB"] == "1000"
    assert e["GANTRY_BLOB_GRACE_SECONDS"] == "604800"
    assert "Blobs    /var/lib/gantry/gantry.db.blobs on the database's volume" in notes("default")


def test_postgresql_with_local_blobs_gets_a_claim_mounted_at_the_blob_dir() -> None:
    docs = objects("postgresql-local-blobs")
    claim = find(docs, "PersistentVolumeClaim", f"{FULLNAME}-blobs")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"
    assert claim["metadata"]["annotations"] == {"backup.example/policy": "daily",
                                                "helm.sh/resource-policy": "keep"}
    assert claim["metadata"]["labels"]["app.kubernetes.io/component"] == "server"
    assert len(kinds(docs, "PersistentVolumeClaim")) == 1, "no SQLite claim with PostgreSQL"
    s = server(docs)
    # One directory of one server: never two pods at once, even during a rollout.
    assert s["spec"]["replicas"] == 1
    assert s["spec"]["strategy"] == {"type": "Recreate"}
    c = container(s, "server")
    e = env(c)
    assert blob_env(e) == {"GANTRY_BLOB_DIR": "/var/lib/gantry/blobs"}
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == e["GANTRY_BLOB_DIR"])
    volumes = {v["name"]: v for v in pod_spec(s)["volumes"]}
    assert volumes[mount["name"]] == {"name": "blobs",
                                      "persistentVolumeClaim": {"claimName": f"{FULLNAME}-blobs"}}
    assert "data" not in volumes
    assert e["GANTRY_MAX_RESULT_BYTES"] == "6291456"
    assert "Blobs    /var/lib/gantry/blobs on the claim demo-gantry-blobs" in notes("postgresql-local-blobs")


@pytest.mark.parametrize(
    ("persistence", "volume"),
    [
        ({"existingClaim": "artifacts-old"}, {"persistentVolumeClaim": {"claimName": "artifacts-old"}}),
        ({"enabled": False}, {"emptyDir": {}}),
    ],
)
def test_postgresql_local_blobs_on_an_existing_claim_or_an_empty_dir(
    persistence: dict[str, Any], volume: dict[str, Any]
) -> None:
    rendered = render({"database": POSTGRESQL, "blobs": {"local": {"persistence": persistence}}})
    docs = objects_of(rendered)
    for kube_version in (KUBE_VERSIONS[0], KUBE_VERSIONS[-1]):
        assert_valid(docs, kube_version)
    assert kinds(docs, "PersistentVolumeClaim") == []
    volumes = {v["name"]: v for v in pod_spec(server(docs))["volumes"]}
    assert volumes["blobs"] == {"name": "blobs", **volume}
    text = next(t for p, t in rendered.items() if p.endswith("NOTES.txt"))
    assert ("blobs.local.persistence.enabled is false" in text) == ("emptyDir" in volume)


def test_s3_blobs_take_credentials_from_the_chart_secret() -> None:
    rendered = rendered_set("postgresql-3-replicas")
    docs = objects_of(rendered)
    assert secret_data(docs, f"{FULLNAME}-s3") == {
        "access-key-id": "s3-inline-key-id",
        "secret-access-key": "s3-inline-secret",
    }
    assert "s3-inline-secret" not in "\n".join(rendered.values())  # only base64, in the Secret
    s = server(docs)
    e = env(container(s, "server"))
    assert blob_env(e) == {
        "GANTRY_S3_BUCKET": "gantry-artifacts",
        "GANTRY_S3_ENDPOINT": "http://minio.storage.svc:9000",
        "GANTRY_S3_REGION": "eu-west-1",
        "GANTRY_S3_ACCESS_KEY_ID": {"secretKeyRef": {"name": f"{FULLNAME}-s3", "key": "access-key-id"}},
        "GANTRY_S3_SECRET_ACCESS_KEY": {"secretKeyRef": {"name": f"{FULLNAME}-s3", "key": "secret-access-key"}},
    }
    # No blob volume: every replica uses the bucket.
    assert {v["name"] for v in pod_spec(s)["volumes"]} == {"tmp"}
    assert kinds(docs, "PersistentVolumeClaim") == []
    assert s["spec"]["strategy"]["type"] == "RollingUpdate"
    # New credentials in the values restart the servers.
    annotations = s["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/s3"])
    # Large numbers stay plain integers.
    assert e["GANTRY_MAX_ARTIFACT_BYTES"] == "53687091200"
    assert e["GANTRY_MAX_RESULT_BYTES"] == "2097152"
    assert e["GANTRY_MAX_ARTIFACTS_PER_JOB"] == "50"
    assert e["GANTRY_BLOB_GRACE_SECONDS"] == "0"
    assert "Blobs    S3 bucket gantry-artifacts at http://minio.storage.svc:9000" in notes("postgresql-3-replicas")


def test_s3_credentials_from_an_existing_secret() -> None:
    docs = objects("existing-secrets")
    s = server(docs)
    e = env(container(s, "server"))
    assert blob_env(e) == {
        # AWS S3: no endpoint, the default region.
        "GANTRY_S3_BUCKET": "acme-gantry-blobs",
        "GANTRY_S3_REGION": "us-east-1",
        "GANTRY_S3_ACCESS_KEY_ID": {"secretKeyRef": {"name": "ops-gantry-s3", "key": "AWS_ACCESS_KEY_ID"}},
        "GANTRY_S3_SECRET_ACCESS_KEY": {"secretKeyRef": {"name": "ops-gantry-s3", "key": "AWS_SECRET_ACCESS_KEY"}},
    }
    assert "checksum/s3" not in s["spec"]["template"]["metadata"].get("annotations", {})
    assert {v["name"] for v in pod_spec(s)["volumes"]} == {"tmp"}
    # The sentinels in blobs.s3.accessKeyId/secretAccessKey: see
    # test_existing_secrets_are_referenced_and_never_inlined.


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
    # The engine bind-mounts each job's socket (<state dir>/relay/...) by its path: dockerd
    # sees the runner's state volume at the runner's path.
    assert dind_mounts[e["GANTRY_RUNNER_STATE_DIR"]] == runner_mounts[e["GANTRY_RUNNER_STATE_DIR"]]
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


def test_hostpath_runner_keeps_its_state_where_the_node_engine_sees_it() -> None:
    """The node's engine bind-mounts each job's socket from the runner's state directory by
    its path: the state is a directory of the node mounted at that same path, and each pod
    has a subdirectory of its own (named by its UID, so pods on one node never share one)."""
    r = runner(objects("networkpolicy-hostpath"))
    pod = pod_spec(r)
    c = container(r, "runner")
    names = [x["name"] for x in c["env"]]
    e = env(c)
    assert e["POD_UID"] == {"fieldRef": {"fieldPath": "metadata.uid"}}
    # $(POD_UID) is expanded only when it is defined earlier in the list.
    assert names.index("POD_UID") < names.index("GANTRY_RUNNER_STATE_DIR")
    assert e["GANTRY_RUNNER_STATE_DIR"] == "/var/lib/gantry-runner/$(POD_UID)"
    mount = next(m for m in c["volumeMounts"] if m["name"] == "state")
    volume = next(v for v in pod["volumes"] if v["name"] == "state")
    assert volume["hostPath"] == {"path": "/var/lib/gantry-runner", "type": "Directory"}
    assert mount["mountPath"] == volume["hostPath"]["path"]
    assert "subPath" not in mount and "subPathExpr" not in mount
    assert "state in /var/lib/gantry-runner on the node" in notes("networkpolicy-hostpath")


def test_hostpath_state_dir_leaves_room_for_the_job_sockets() -> None:
    """A socket path holds about 100 bytes (the runner falls back to /tmp, which the node's
    engine cannot see, beyond that): <stateDir>/<pod UID>/relay/<12 characters>/gantry.sock
    must fit with the longest stateDir the schema allows."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    state_dir = schema["properties"]["runner"]["properties"]["docker"]["properties"]["stateDir"]
    uid = "0" * 36
    longest = "/" + "x" * (state_dir["maxLength"] - 1) + f"/{uid}/relay/" + "y" * 12 + "/gantry.sock"
    assert len(longest) <= 100
    r = runner(objects_of(render({"runner": {"docker": {"mode": "hostPath",
                                                         "stateDir": "/" + "s" * 31}}})))
    assert env(container(r, "runner"))["GANTRY_RUNNER_STATE_DIR"] == "/" + "s" * 31 + "/$(POD_UID)"


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
