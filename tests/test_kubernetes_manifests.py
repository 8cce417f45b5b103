"""deploy/kubernetes/ validates offline and agrees with the server it deploys.

Built-in kinds: `kubernetes-validate`'s strict schemas of Kubernetes KUBERNETES_VERSION (unknown
fields are errors, as with kubectl's default server-side strict field validation). The
InferencePool: the vendored CRD's openAPIV3Schema (crds/), strict the same way, plus the CRD's
two CEL rules. The endpoint picker's config: llm-d-router v0.10.0's EndpointPickerConfig fields
and registered plugin types. Then the cross-references no schema sees: settings that exist,
probe paths the server serves, ports, selectors, names. `test_a_broken_manifest_is_caught`
breaks the manifests in one way at a time and checks each break is reported.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from fastapi.routing import APIRoute

from server.app import create_app
from server.settings import Settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
CRD = DEPLOY / "crds" / "inferencepools.inference.networking.k8s.io.yaml"
KUBERNETES_VERSION = "1.34.0"
ENV_PREFIX = "GEMMA_SERVER_"

# llm-d-router v0.10.0 (commit 71f4f0999f95b96c49a9d0c4afbd18dfdb943c26):
# apix/config/v1alpha1/endpointpickerconfig_types.go (fields), cmd/epp/runner/runner.go
# (fwkplugin.Register calls: the plugin types used here), pkg/epp/server/options.go (flags).
EPP_CONFIG_FIELDS = {
    "apiVersion",
    "kind",
    "featureGates",
    "plugins",
    "schedulingProfiles",
    "dataLayer",
    "flowControl",
    "requestHandler",
    "saturationDetector",
    "parser",
}
EPP_PLUGIN_TYPES = {
    "metrics-data-source",
    "core-metrics-extractor",
    "queue-scorer",
    "kv-cache-utilization-scorer",
    "prefix-cache-scorer",
    "lora-affinity-scorer",
    "running-requests-size-scorer",
    "max-score-picker",
    "random-picker",
    "weighted-random-picker",
    "single-profile-handler",
    "openai-parser",
}
EPP_FLAGS = {
    "pool-name",
    "pool-namespace",
    "pool-group",
    "config-file",
    "config-text",
    "grpc-port",
    "grpc-health-port",
    "metrics-port",
    "zap-encoder",
    "v",
    "metrics-endpoint-auth",
    "tracing",
    "secure-serving",
    "ha-enable-leader-election",
}

Doc = dict[str, Any]


def load_manifests() -> list[Doc]:
    """Every object of the kustomization's resources, in order."""
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    docs: list[Doc] = []
    for name in kustomization["resources"]:
        docs.extend(d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d)
    return docs


def crd_schema() -> Doc:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists the known ones."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(item) for item in schema]
    return schema


def find(docs: list[Doc], kind: str, name: str) -> Doc | None:
    return next(
        (d for d in docs if d.get("kind") == kind and d.get("metadata", {}).get("name") == name),
        None,
    )


def served_paths() -> set[str]:
    app = create_app(Settings(playground=False))
    return {route.path for route in app.routes if isinstance(route, APIRoute)}


def schema_problems(docs: list[Doc]) -> Iterator[str]:
    pool_schema = strict(crd_schema())
    for doc in docs:
        where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc.get("apiVersion") == "inference.networking.k8s.io/v1":
            if doc.get("kind") != "InferencePool":
                yield f"{where}: no CRD vendored for this kind"
                continue
            for error in jsonschema.Draft7Validator(pool_schema).iter_errors(doc):
                yield f"{where}: {error.json_path}: {error.message}"
            # The CRD's x-kubernetes-validations (CEL), which jsonschema does not run.
            spec = doc.get("spec", {})
            ref = spec.get("endpointPickerRef", {})
            if ref.get("kind", "Service") == "Service" and "port" not in ref:
                yield f"{where}: endpointPickerRef: port is required when kind is Service"
            numbers = [port.get("number") for port in spec.get("targetPorts", [])]
            if len(numbers) != len(set(numbers)):
                yield f"{where}: targetPorts: port number must be unique"
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            yield f"{where}: {list(exc.path)}: {exc.message}"
        except Exception as exc:  # an unknown kind or apiVersion
            yield f"{where}: {exc}"


def epp_problems(docs: list[Doc], paths: set[str]) -> Iterator[str]:
    pool = find(docs, "InferencePool", "gemma-adapter-server")
    if pool is None:
        yield "no InferencePool gemma-adapter-server"
        return
    ref = pool["spec"].get("endpointPickerRef", {})
    service = find(docs, "Service", ref.get("name", ""))
    epp = find(docs, "Deployment", ref.get("name", ""))
    if service is None or epp is None:
        yield f"endpointPickerRef {ref.get('name')}: no Service and Deployment of that name"
        return
    (container,) = epp["spec"]["template"]["spec"]["containers"]
    args: list[str] = container.get("args", [])
    flags: dict[str, str] = {}
    for index, arg in enumerate(args):
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            if name not in EPP_FLAGS:
                yield f"endpoint picker: unknown flag --{name}"
            has_next = index + 1 < len(args) and not args[index + 1].startswith("--")
            flags[name] = value or (args[index + 1] if has_next else "")
    if flags.get("pool-name") != pool["metadata"]["name"]:
        yield "endpoint picker: --pool-name is not the InferencePool's name"
    if flags.get("pool-group") != "inference.networking.k8s.io":
        yield "endpoint picker: --pool-group is not the InferencePool's group"
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    service_ports = {p["port"]: p for p in service["spec"]["ports"]}
    wanted = ref.get("port", {}).get("number")
    if wanted not in service_ports:
        yield f"endpointPickerRef port {wanted}: not a port of the picker's Service"
    elif ports.get(service_ports[wanted]["targetPort"]) != int(flags.get("grpc-port", "9002")):
        yield "endpoint picker Service: its port does not reach the picker's --grpc-port"
    # The picker's config: the file --config-file names, from the ConfigMap mounted there.
    config_file = Path(flags.get("config-file", ""))
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in epp["spec"]["template"]["spec"].get("volumes", [])}
    text = None
    for volume_name, path in mounts.items():
        source = volumes.get(volume_name, {}).get("configMap")
        if source and config_file.parent == Path(path):
            config_map = find(docs, "ConfigMap", source["name"]) or {}
            text = config_map.get("data", {}).get(config_file.name)
    if text is None:
        yield f"endpoint picker: {config_file} is in no mounted ConfigMap"
        return
    config = yaml.safe_load(text)
    if (config.get("apiVersion"), config.get("kind")) != (
        "llm-d.ai/v1alpha1",
        "EndpointPickerConfig",
    ):
        yield "endpoint picker config: not llm-d.ai/v1alpha1 EndpointPickerConfig"
    for key in set(config) - EPP_CONFIG_FIELDS:
        yield f"endpoint picker config: unknown field {key}"
    names = set()
    for plugin in config.get("plugins", []):
        if set(plugin) - {"name", "type", "parameters"}:
            yield f"endpoint picker config: plugin fields {sorted(plugin)}"
        if plugin.get("type") not in EPP_PLUGIN_TYPES:
            yield f"endpoint picker config: unknown plugin type {plugin.get('type')}"
        names.add(plugin.get("name", plugin.get("type")))
        if plugin.get("type") == "metrics-data-source":
            scraped = plugin.get("parameters", {}).get("path", "/metrics")
            if scraped not in paths:
                yield f"endpoint picker config: scrapes {scraped}, which the server does not serve"
    refs = [
        entry["pluginRef"]
        for profile in config.get("schedulingProfiles", [])
        for entry in profile.get("plugins", [])
    ]
    for source in config.get("dataLayer", {}).get("sources", []):
        refs.append(source["pluginRef"])
        refs.extend(extractor["pluginRef"] for extractor in source.get("extractors", []))
    for name in set(refs) - names:
        yield f"endpoint picker config: pluginRef {name} names no plugin"
    lora_names = {
        p.get("name", p.get("type"))
        for p in config.get("plugins", [])
        if p.get("type") == "lora-affinity-scorer"
    }
    lora = [
        entry
        for profile in config.get("schedulingProfiles", [])
        for entry in profile.get("plugins", [])
        if entry["pluginRef"] in lora_names
    ]
    if not lora or not all(entry.get("weight", 0) > 0 for entry in lora):
        yield "endpoint picker config: lora-affinity-scorer is not in a profile with a weight"


def model_server_problems(docs: list[Doc], paths: set[str]) -> Iterator[str]:
    server = find(docs, "Deployment", "gemma-adapter-server")
    if server is None:
        yield "no Deployment gemma-adapter-server"
        return
    pod = server["spec"]["template"]
    labels = pod["metadata"].get("labels", {})
    spec = pod["spec"]
    (container,) = spec["containers"]

    # Settings: every GEMMA_SERVER_* variable the pod gets is a setting, and they validate.
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        kind, ref = (
            ("ConfigMap", source["configMapRef"])
            if "configMapRef" in source
            else (
                "Secret",
                source["secretRef"],
            )
        )
        found = find(docs, kind, ref["name"])
        if found is None:
            yield f"envFrom: no {kind} {ref['name']}"
            continue
        env.update(found.get("data") or found.get("stringData") or {})
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name not in fields:
            yield f"{name}: not a setting of server/settings.py"
    known = {
        name.removeprefix(ENV_PREFIX).lower(): value
        for name, value in env.items()
        if name in fields
    }
    try:
        settings = Settings.model_validate(known)  # the strings, as from the environment
    except ValueError as exc:
        yield f"settings do not validate: {exc}"
        return
    if settings.host in {"127.0.0.1", "localhost", "::1"}:
        yield f"GEMMA_SERVER_HOST {settings.host}: the pod would not be reachable"

    # Ports and probes: the container port is the server's, the probes ask routes it serves.
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    if settings.port not in ports.values():
        yield f"the server listens on {settings.port}, the container declares {ports}"
    for probe_name, path in [
        ("startupProbe", "/health"),
        ("livenessProbe", "/health"),
        ("readinessProbe", "/ready"),
    ]:
        probe = container.get(probe_name, {}).get("httpGet")
        if probe is None:
            yield f"{probe_name}: missing (an HTTP probe of {path})"
            continue
        if probe.get("path") != path or path not in paths:
            yield f"{probe_name}: asks {probe.get('path')}, not {path} (served: {path in paths})"
        if ports.get(probe["port"], probe["port"]) != settings.port:
            yield f"{probe_name}: port {probe['port']} is not the server's {settings.port}"

    # The GPU: requested, and limits equal requests (extended resources cannot overcommit).
    resources = container.get("resources", {})
    gpu_requests = resources.get("requests", {}).get("nvidia.com/gpu")
    if not gpu_requests or gpu_requests != resources.get("limits", {}).get("nvidia.com/gpu"):
        yield "nvidia.com/gpu: requested and limited to the same count"

    # Shutdown: the drain and the preStop pause end before SIGKILL.
    pause = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if settings.drain_timeout_seconds + pause >= grace:
        yield f"drain {settings.drain_timeout_seconds}s + preStop {pause}s >= grace {grace}s"

    # Everything that selects the pods selects these labels.
    pool = find(docs, "InferencePool", "gemma-adapter-server")
    selectors = {
        "Deployment": server["spec"]["selector"]["matchLabels"],
        "PodDisruptionBudget": (find(docs, "PodDisruptionBudget", "gemma-adapter-server") or {})
        .get("spec", {})
        .get("selector", {})
        .get("matchLabels"),
        "Service": (find(docs, "Service", "gemma-adapter-server") or {})
        .get("spec", {})
        .get("selector"),
        "InferencePool": (pool or {}).get("spec", {}).get("selector", {}).get("matchLabels"),
    }
    for kind, selector in selectors.items():
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            yield f"{kind} selector {selector} does not select the pods ({labels})"
    if pool is not None:
        numbers = [p.get("number") for p in pool["spec"].get("targetPorts", [])]
        if numbers != [settings.port]:
            yield f"InferencePool targetPorts {numbers}: the server listens on {settings.port}"
    for volume in spec.get("volumes", []):
        claim = volume.get("persistentVolumeClaim")
        if claim and find(docs, "PersistentVolumeClaim", claim["claimName"]) is None:
            yield f"volume {volume['name']}: no PersistentVolumeClaim {claim['claimName']}"


def problems(docs: list[Doc], paths: set[str]) -> list[str]:
    return [
        *schema_problems(docs),
        *epp_problems(docs, paths),
        *model_server_problems(docs, paths),
    ]


@pytest.fixture(scope="module")
def paths() -> set[str]:
    return served_paths()


def test_manifests_validate(paths: set[str]) -> None:
    docs = load_manifests()
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "InferencePool",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        "Secret",
        "Service",
        "ServiceAccount",
    ]
    assert problems(docs, paths) == []


def test_every_manifest_file_is_deployed() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    files = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_vendored_crd_is_upstream_and_valid() -> None:
    """The CRD below its header is the upstream file (sha256 in the header); it validates."""
    text = CRD.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    body = text[text.index("apiVersion:") :]
    (digest,) = [
        m.group(1) for line in header if (m := re.search(r"sha256.*: ([0-9a-f]{64})", line))
    ]
    assert hashlib.sha256(body.encode()).hexdigest() == digest
    crd = yaml.safe_load(body)
    kubernetes_validate.validate(crd, KUBERNETES_VERSION, strict=True)
    assert crd["spec"]["group"] == "inference.networking.k8s.io"


def _set(path: str, value: Any) -> Callable[[list[Doc]], None]:
    """A change at `Kind/name:dotted.path` (integers index lists); None deletes."""

    def change(docs: list[Doc]) -> None:
        target, _, dotted = path.partition(":")
        kind, name = target.split("/")
        node: Any = find(docs, kind, name)
        keys = [int(k) if k.isdigit() else k for k in dotted.split(".")]
        for key in keys[:-1]:
            node = node[key]
        if value is None:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value

    return change


def _epp_config(edit: Callable[[Doc], None]) -> Callable[[list[Doc]], None]:
    def change(docs: list[Doc]) -> None:
        config_map = find(docs, "ConfigMap", "gemma-adapter-server-epp")
        assert config_map is not None
        config = yaml.safe_load(config_map["data"]["epp-config.yaml"])
        edit(config)
        config_map["data"]["epp-config.yaml"] = yaml.safe_dump(config)

    return change


SERVER = "Deployment/gemma-adapter-server:spec.template.spec.containers.0"
BREAKS: dict[str, Callable[[list[Doc]], None]] = {
    "unknown Deployment field": _set(f"{SERVER}.livenessprobe", {"tcpSocket": {"port": 8000}}),
    "port as a word": _set(f"{SERVER}.ports.0.containerPort", "eight-thousand"),
    "liveness on a path the server lacks": _set(f"{SERVER}.livenessProbe.httpGet.path", "/healthz"),
    "readiness on /health": _set(f"{SERVER}.readinessProbe.httpGet.path", "/health"),
    "probe on another port": _set(f"{SERVER}.readinessProbe.httpGet.port", 8080),
    "misspelt setting": _set("ConfigMap/gemma-adapter-server:data.GEMMA_SERVER_MAX_LORA", "4"),
    "setting that does not validate": _set(
        "ConfigMap/gemma-adapter-server:data.GEMMA_SERVER_MAX_LORA_RANK", "48"
    ),
    "loopback bind": _set("ConfigMap/gemma-adapter-server:data.GEMMA_SERVER_HOST", "127.0.0.1"),
    "GPU without a limit": _set(f"{SERVER}.resources.limits", {"memory": "64Gi"}),
    "drain longer than the grace period": _set(
        "Deployment/gemma-adapter-server:spec.template.spec.terminationGracePeriodSeconds", 30
    ),
    "PDB selecting nothing": _set(
        "PodDisruptionBudget/gemma-adapter-server:spec.selector.matchLabels",
        {"app.kubernetes.io/name": "other"},
    ),
    "pool without targetPorts": _set("InferencePool/gemma-adapter-server:spec.targetPorts", None),
    "pool with an unknown field": _set("InferencePool/gemma-adapter-server:spec.targetPort", 8000),
    "pool picker without a port": _set(
        "InferencePool/gemma-adapter-server:spec.endpointPickerRef.port", None
    ),
    "pool on another port": _set(
        "InferencePool/gemma-adapter-server:spec.targetPorts", [{"number": 8001}]
    ),
    "picker flag that does not exist": _set(
        "Deployment/gemma-adapter-server-epp:spec.template.spec.containers.0.args.0", "--pool"
    ),
    "plugin type misspelt": _epp_config(
        lambda c: c["plugins"][5].update(type="lora-affinity-scorrer")
    ),
    "LoRA affinity not in the profile": _epp_config(
        lambda c: c["schedulingProfiles"][0]["plugins"].pop(3)
    ),
    "picker scraping a path the server lacks": _epp_config(
        lambda c: c["plugins"][0]["parameters"].update(path="/metrics/routers")
    ),
    "pluginRef to nothing": _epp_config(
        lambda c: c["schedulingProfiles"][0]["plugins"][0].update(pluginRef="queue")
    ),
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_a_broken_manifest_is_caught(name: str, paths: set[str]) -> None:
    docs = copy.deepcopy(load_manifests())
    BREAKS[name](docs)
    assert problems(docs, paths), f"{name}: not caught"
