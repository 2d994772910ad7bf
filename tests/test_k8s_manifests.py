"""Static checks of the Kubernetes manifests in deploy/k8s (the base) and deploy/k8s/keda.

No cluster and no kustomize binary are needed. `build` assembles a kustomization the way
`kubectl apply -k` would for the few fields our kustomizations use (resources, namespace, images,
and `$patch: delete` patches); a kustomization using any other field fails the build, so the
check never silently diverges from kustomize. Every object is then validated against the
Kubernetes OpenAPI schemas bundled in the PyPI package `kubernetes-validate` (offline, strict:
unknown fields are errors). Custom resources (KEDA) have no bundled schema and get an explicit
schema-less check instead. The cross-references the schemas cannot see are checked here:
ConfigMap/Secret/PVC references, Service and PDB selectors, probe and Service ports, HPA
targets and their replica bounds against the topic catalog's partition counts, and each
service's environment against its own settings class.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from schemas.topics import EVENTS, REQUESTS
from tests.test_deploy_files import (
    LISTEN,
    OTHER_PORTS,
    SLUICEWAY_SERVICES,
    setting_names,
    settings_class,
    settings_from,
)

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = {"base": K8S, "keda": K8S / "keda"}
DOCKERFILE = REPO / "deploy" / "Dockerfile"

# The oldest Kubernetes the manifests claim (kubectl >= 1.27 has kustomize v5; HPA autoscaling/v2,
# PDB policy/v1 and Job TTL are GA well before) and a recent one; both bundled by
# kubernetes-validate >= 1.34.
KUBERNETES_VERSIONS = ("1.30.0", "1.34.0")
NAMESPACE = "sluiceway"
KUSTOMIZE_FIELDS = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
CLUSTER_SCOPED = {
    "Namespace",
    "PersistentVolume",
    "StorageClass",
    "ClusterRole",
    "ClusterRoleBinding",
    "PriorityClass",
    "CustomResourceDefinition",
}
# Custom resources we ship, by API group: no bundled schema; see test_keda_object_is_well_formed.
CUSTOM_GROUPS = {"keda.sh"}
SERVICES = SLUICEWAY_SERVICES
PLACEHOLDER = "REPLACE-ME"
_DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


# --- a kustomize subset -------------------------------------------------------------------------


class UnsupportedKustomization(AssertionError):
    """The kustomization uses something `build` does not implement."""


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file."""
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def image_name(image: str) -> str:
    """An image reference without its tag or digest."""
    name = image.split("@", 1)[0]
    head, _, last = name.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


def pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod spec(s) inside a workload object (Deployment, Job, ...), if any."""
    spec = obj.get("spec") or {}
    template = spec.get("template") or (spec.get("jobTemplate") or {}).get("spec", {}).get(
        "template"
    )
    if template and "spec" in template:
        return [template["spec"]]
    return []


def containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every container and init container of a workload object."""
    for pod in pod_specs(obj):
        yield from pod.get("initContainers") or []
        yield from pod.get("containers") or []


def _delete_patch(objects: list[dict[str, Any]], entry: dict[str, Any]) -> list[dict[str, Any]]:
    target = entry.get("target") or {}
    body = yaml.safe_load(entry.get("patch", "")) if "patch" in entry else None
    if set(entry) - {"target", "patch"} or not isinstance(body, dict):
        raise UnsupportedKustomization(f"only inline patches are built here: {entry}")
    if body.get("$patch") != "delete" or set(target) - {"kind", "name"}:
        raise UnsupportedKustomization(f"only `$patch: delete` by kind and name: {entry}")
    kind = target.get("kind", body.get("kind"))
    name = target.get("name", (body.get("metadata") or {}).get("name"))
    matched = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert matched, f"patch deletes {kind}/{name}, which the resources do not contain"
    return [o for o in objects if not any(o is m for m in matched)]


def build(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k directory` would apply (for the fields we use)."""
    kustomization = load_documents(directory / "kustomization.yaml")[0]
    unsupported = set(kustomization) - KUSTOMIZE_FIELDS
    if unsupported:
        raise UnsupportedKustomization(
            f"{directory}: {sorted(unsupported)} are not built by "
            "tests/test_k8s_manifests.py; extend `build` first"
        )
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources") or []:
        path = (directory / entry).resolve()
        objects += build(path) if path.is_dir() else load_documents(path)
    for entry in kustomization.get("patches") or []:
        objects = _delete_patch(objects, entry)
    namespace = kustomization.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    for rule in kustomization.get("images") or []:
        for container in (c for obj in objects for c in containers(obj)):
            if image_name(container["image"]) != rule["name"]:
                continue
            name = rule.get("newName", rule["name"])
            if "digest" in rule:
                container["image"] = f"{name}@{rule['digest']}"
            else:
                current = container["image"][len(image_name(container["image"])) :]
                container["image"] = name + (f":{rule['newTag']}" if "newTag" in rule else current)
    return objects


BUILDS = {overlay: build(directory) for overlay, directory in OVERLAYS.items()}
BASE = BUILDS["base"]


def object_id(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    return next((o for o in of_kind(objects, kind) if o["metadata"]["name"] == name), None)


def api_group(obj: dict[str, Any]) -> str:
    return obj["apiVersion"].rpartition("/")[0]


def all_objects() -> list[tuple[str, dict[str, Any]]]:
    """(overlay, object) pairs, each distinct object once (overlays repeat the base)."""
    seen: set[str] = set()
    result = []
    for overlay, objects in BUILDS.items():
        for obj in objects:
            key = yaml.safe_dump(obj, sort_keys=True)
            if key not in seen:
                seen.add(key)
                result.append((overlay, obj))
    return result


def deployment(component: str, objects: list[dict[str, Any]] = BASE) -> dict[str, Any]:
    found = named(objects, "Deployment", f"sluiceway-{component}")
    assert found is not None, f"no Deployment sluiceway-{component}"
    return found


def only_container(obj: dict[str, Any]) -> dict[str, Any]:
    found = list(containers(obj))
    assert len(found) == 1, f"{object_id(obj)}: expected one container"
    return found[0]


def port_number(container: dict[str, Any], port: int | str) -> int | None:
    """The container port a probe or Service port refers to (by number or name), else None."""
    for declared in container.get("ports") or []:
        if port in (declared["containerPort"], declared.get("name")):
            return declared["containerPort"]
    return None


# --- the build itself ---------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_kustomization_builds_with_unique_namespaced_objects(overlay: str) -> None:
    objects = BUILDS[overlay]
    assert objects
    ids = [(o["apiVersion"].split("/")[0], o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(ids) == len(set(ids)), "duplicate objects"
    for obj in objects:
        assert {"apiVersion", "kind", "metadata"} <= set(obj), obj
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"], object_id(obj)
        else:
            assert obj["metadata"]["namespace"] == NAMESPACE, object_id(obj)
    assert named(objects, "Namespace", NAMESPACE) is not None


def test_the_build_refuses_fields_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("commonLabels: {a: b}\nresources: []\n")
    with pytest.raises(UnsupportedKustomization):
        build(tmp_path)


# --- schemas ------------------------------------------------------------------------------------


def kubernetes_validate() -> Any:
    """The `kubernetes_validate.utils` module; a missing package fails (it is a dev extra)."""
    try:
        return importlib.import_module("kubernetes_validate.utils")
    except ImportError:
        pytest.fail(
            "the PyPI package kubernetes-validate is not installed, so the Kubernetes manifests "
            "cannot be validated: `pip install 'kubernetes-validate>=1.34'` (it belongs to the "
            "dev extras: `pip install -e '.[dev]'`)"
        )


CORE_OBJECTS = [(o, obj) for o, obj in all_objects() if api_group(obj) not in CUSTOM_GROUPS]
CUSTOM_OBJECTS = [(o, obj) for o, obj in all_objects() if api_group(obj) in CUSTOM_GROUPS]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    "obj", [obj for _, obj in CORE_OBJECTS], ids=[f"{o}:{object_id(x)}" for o, x in CORE_OBJECTS]
)
def test_object_validates_against_the_kubernetes_schema(obj: dict[str, Any], version: str) -> None:
    utils = kubernetes_validate()
    problem = None
    try:
        utils.validate(obj, version, strict=True)
    except utils.ValidationError as error:  # its str() carries the whole schema: keep it short
        where = ".".join(str(part) for part in error.path)
        problem = f"{object_id(obj)} is invalid for Kubernetes {version}: {where}: {error.message}"
    except utils.SchemaNotFoundError as error:
        problem = f"{object_id(obj)}: {error.message}; a custom resource? add its group"
    if problem:
        pytest.fail(problem)


def test_custom_resources_are_only_keda() -> None:
    assert CUSTOM_OBJECTS, "the KEDA overlay ships a ScaledObject"
    assert all(overlay == "keda" for overlay, _ in CUSTOM_OBJECTS), "CRDs stay out of the base"


@pytest.mark.parametrize(
    "obj", [obj for _, obj in CUSTOM_OBJECTS], ids=[object_id(x) for _, x in CUSTOM_OBJECTS]
)
def test_keda_object_is_well_formed(obj: dict[str, Any]) -> None:
    """Schema-less: KEDA's CRDs are not bundled, so check what the scaler relies on."""
    assert obj["apiVersion"] == "keda.sh/v1alpha1"
    assert obj["kind"] == "ScaledObject", "add a check for any other KEDA kind"
    assert _DNS_1123.match(obj["metadata"]["name"]), obj["metadata"]["name"]
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    spec = obj["spec"]
    target = deployment("inference", BUILDS["keda"])
    assert spec["scaleTargetRef"]["name"] == target["metadata"]["name"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= REQUESTS.partitions
    from services.inference.settings import InferenceSettings

    triggers = spec["triggers"]
    assert [trigger["type"] for trigger in triggers] == ["kafka"]
    metadata = triggers[0]["metadata"]
    assert all(isinstance(value, str) for value in metadata.values()), "trigger values are strings"
    assert metadata["consumerGroup"] == InferenceSettings.model_fields["inference_group_id"].default
    assert metadata["topic"] == REQUESTS.name
    assert int(metadata["lagThreshold"]) > 0
    assert metadata.get("allowIdleConsumers", "false") == "false"
    env_name = metadata["bootstrapServersFromEnv"]
    assert env_name in environment_of(target, resolve_secrets=False), env_name


def test_keda_overlay_replaces_the_inference_hpa() -> None:
    keda = BUILDS["keda"]
    assert named(keda, "HorizontalPodAutoscaler", "sluiceway-inference") is None
    assert named(keda, "ScaledObject", "sluiceway-inference") is not None
    assert named(keda, "HorizontalPodAutoscaler", "sluiceway-features") is not None
    rest = [o for o in keda if o["kind"] != "ScaledObject"]
    assert len(rest) == len(BASE) - 1


# --- references between objects -----------------------------------------------------------------


WORKLOADS = [obj for obj in BASE if pod_specs(obj)]


@pytest.mark.parametrize("obj", WORKLOADS, ids=object_id)
def test_configmap_secret_and_volume_references_exist(obj: dict[str, Any]) -> None:
    for container in containers(obj):
        for source in container.get("envFrom") or []:
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if key in source and not source[key].get("optional"):
                    assert named(BASE, kind, source[key]["name"]), f"{kind} {source[key]}"
        for variable in container.get("env") or []:
            ref = variable.get("valueFrom") or {}
            for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                if key in ref:
                    found = named(BASE, kind, ref[key]["name"])
                    assert found, f"{variable['name']}: no {kind} {ref[key]['name']}"
                    data = {**(found.get("data") or {}), **(found.get("stringData") or {})}
                    assert ref[key]["key"] in data, f"{variable['name']}: no key {ref[key]}"
        mounted = {mount["name"] for mount in container.get("volumeMounts") or []}
        declared = {volume["name"] for volume in pod_specs(obj)[0].get("volumes") or []}
        assert mounted <= declared, f"mounts of undeclared volumes {mounted - declared}"
    for volume in pod_specs(obj)[0].get("volumes") or []:
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            assert named(BASE, "PersistentVolumeClaim", claim), claim
        for kind, key, field in (
            ("ConfigMap", "configMap", "name"),
            ("Secret", "secret", "secretName"),
        ):
            if key in volume:
                assert named(BASE, kind, volume[key][field]), volume


def matching_deployments(selector: dict[str, str]) -> list[dict[str, Any]]:
    """Deployments whose pods carry every label of `selector`."""
    return [
        obj
        for obj in of_kind(BASE, "Deployment")
        if selector.items() <= obj["spec"]["template"]["metadata"]["labels"].items()
    ]


@pytest.mark.parametrize("obj", of_kind(BASE, "Deployment"), ids=object_id)
def test_deployment_selector_matches_its_own_pods(obj: dict[str, Any]) -> None:
    selector = obj["spec"]["selector"]["matchLabels"]
    assert set(obj["spec"]["selector"]) == {"matchLabels"}
    assert selector.items() <= obj["spec"]["template"]["metadata"]["labels"].items()
    assert matching_deployments(selector) == [obj], "selectors of two Deployments overlap"


@pytest.mark.parametrize("obj", of_kind(BASE, "Service"), ids=object_id)
def test_service_selects_a_deployment_on_a_container_port(obj: dict[str, Any]) -> None:
    selector = obj["spec"]["selector"]
    targets = matching_deployments(selector)
    assert len(targets) == 1, f"selector {selector} matches {len(targets)} Deployments"
    container = only_container(targets[0])
    for port in obj["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        assert port_number(container, target), f"{port} is not a port of {object_id(targets[0])}"


def test_http_services_and_metrics_are_exposed() -> None:
    services = {o["metadata"]["name"]: o for o in of_kind(BASE, "Service")}
    for component in ("ingest", "features", "rollout"):
        assert f"sluiceway-{component}" in services, component
    for component in ("inference", "monitor"):
        assert f"sluiceway-{component}-metrics" in services, component


@pytest.mark.parametrize("obj", of_kind(BASE, "PodDisruptionBudget"), ids=object_id)
def test_pdb_selects_a_deployment(obj: dict[str, Any]) -> None:
    assert len(matching_deployments(obj["spec"]["selector"]["matchLabels"])) == 1


# Topic each horizontally scaled consumer reads: more replicas than partitions would sit idle.
SCALED_TOPICS = {"sluiceway-inference": REQUESTS, "sluiceway-features": EVENTS}


def test_features_and_inference_have_cpu_hpas() -> None:
    names = {o["spec"]["scaleTargetRef"]["name"] for o in of_kind(BASE, "HorizontalPodAutoscaler")}
    assert names == set(SCALED_TOPICS)


@pytest.mark.parametrize("obj", of_kind(BASE, "HorizontalPodAutoscaler"), ids=object_id)
def test_hpa_targets_a_deployment_within_its_topic_partitions(obj: dict[str, Any]) -> None:
    spec = obj["spec"]
    target = named(BASE, "Deployment", spec["scaleTargetRef"]["name"])
    assert target is not None and spec["scaleTargetRef"]["kind"] == "Deployment"
    topic = SCALED_TOPICS[target["metadata"]["name"]]
    assert 1 <= spec["minReplicas"] <= spec["maxReplicas"] <= topic.partitions, topic.name
    assert target["spec"]["replicas"] >= spec["minReplicas"]
    resources = [m["resource"]["name"] for m in spec["metrics"] if m["type"] == "Resource"]
    assert resources == ["cpu"]
    # Utilization is relative to the request, so the container must request CPU.
    assert only_container(target)["resources"]["requests"]["cpu"]


# --- each service: command, ports, probes, settings ----------------------------------------------


def environment_of(obj: dict[str, Any], resolve_secrets: bool) -> dict[str, str]:
    """A workload's container environment as the pod gets it (envFrom first, env wins)."""
    container = only_container(obj)
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            env.update(named(BASE, "ConfigMap", source["configMapRef"]["name"])["data"])
        if "secretRef" in source and resolve_secrets:
            env.update(named(BASE, "Secret", source["secretRef"]["name"])["stringData"])
    for variable in container.get("env") or []:
        if "value" in variable:
            env[variable["name"]] = variable["value"]
    return env


def service_settings(component: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The service's settings as its pod would read them (Secret placeholders left out)."""
    env = environment_of(deployment(component), resolve_secrets=False)
    return settings_from(env, settings_class(component), monkeypatch)


@pytest.mark.parametrize("component", SERVICES)
def test_deployment_runs_the_service_module(component: str) -> None:
    container = only_container(deployment(component))
    assert "command" not in container, "keep the image's `python -m` entrypoint"
    assert container["args"] == [f"services.{component}"]
    assert (REPO / "services" / component / "__main__.py").is_file()


@pytest.mark.parametrize("component", SERVICES)
def test_service_listens_where_ports_and_probes_point(
    component: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    obj = deployment(component)
    container = only_container(obj)
    settings = service_settings(component, monkeypatch)
    port_field, host_field = LISTEN[component]
    listen = getattr(settings, port_field)
    others = [getattr(settings, field) for field in OTHER_PORTS.get(component, ())]
    assert [p["containerPort"] for p in container["ports"]] == [listen, *others]
    if host_field:
        assert getattr(settings, host_field) == "0.0.0.0", "bind every interface in a pod"
    expected = {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container[probe_name]["httpGet"]
        assert port_number(container, probe["port"]) == listen, probe_name
        assert probe["path"] == expected.get(probe_name, "/healthz"), probe_name
    annotations = obj["spec"]["template"]["metadata"].get("annotations") or {}
    assert annotations.get("prometheus.io/port") == str(listen)
    assert annotations.get("prometheus.io/path") == "/metrics"


@pytest.mark.parametrize("component", SERVICES)
def test_service_reads_the_model_repository_where_it_is_mounted(
    component: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = service_settings(component, monkeypatch)
    mounts = {m["mountPath"]: m for m in only_container(deployment(component))["volumeMounts"]}
    needs_models = component in ("ingest", "inference", "monitor")
    roots = {str(settings.model_repository)}
    if component == "monitor":
        roots.add(str(settings.model_repository))
    for root in roots:
        assert (root in mounts) == needs_models, f"{component}: {root}"
        if needs_models:
            assert mounts[root].get("readOnly") is True


def test_every_configured_variable_is_a_setting() -> None:
    """A misspelt key would be silently ignored (`extra="ignore"`), so catch it here."""
    known = setting_names()
    configured: set[str] = set()
    for obj in of_kind(BASE, "ConfigMap"):
        configured |= set(obj["data"])
    for obj in of_kind(BASE, "Secret"):
        configured |= set(obj.get("stringData") or {})
    for obj in WORKLOADS:
        configured |= {var["name"] for c in containers(obj) for var in c.get("env") or []}
    unknown = {name for name in configured if name.startswith("SLUICE_")} - known
    assert not unknown, f"not a setting of any service: {sorted(unknown)}"


def test_secret_holds_only_marked_placeholders() -> None:
    secrets = of_kind(BASE, "Secret")
    assert [s["metadata"]["name"] for s in secrets] == ["sluiceway-secrets"]
    secret = secrets[0]
    assert "data" not in secret, "no encoded values: every value is a visible placeholder"
    assert secret["stringData"]
    for key, value in secret["stringData"].items():
        assert value.startswith(PLACEHOLDER), f"{key} is not a {PLACEHOLDER} placeholder"


def test_every_workload_reads_the_shared_config_and_secrets() -> None:
    for obj in WORKLOADS:
        refs = [next(iter(source.values()))["name"] for source in only_container(obj)["envFrom"]]
        assert refs == ["sluiceway-config", "sluiceway-secrets"], object_id(obj)


# --- images and pod hardening -------------------------------------------------------------------


def dockerfile_user() -> str:
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE.read_text(encoding="utf-8"), re.M)
    assert users, "deploy/Dockerfile sets no USER"
    return users[-1]


@pytest.mark.parametrize("obj", WORKLOADS, ids=object_id)
def test_pods_run_the_pinned_image_as_the_dockerfile_user(obj: dict[str, Any]) -> None:
    uid, _, gid = dockerfile_user().partition(":")
    pod = pod_specs(obj)[0]
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    assert str(context["runAsUser"]) == uid and str(context["runAsGroup"]) == (gid or uid)
    assert pod.get("automountServiceAccountToken") is False
    for container in containers(obj):
        image = container["image"]
        tag = image[len(image_name(image)) :].lstrip(":@")
        assert tag and tag != "latest", f"{image} is not pinned (kustomization `images`)"
        assert image_name(image) == "sluiceway", image
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        resources = container["resources"]
        assert resources["requests"].keys() >= {"cpu", "memory"}
        assert "memory" in resources["limits"]
        for amount in (*resources["requests"].values(), *resources["limits"].values()):
            # The schema accepts any string as a quantity; the API server does not.
            assert _QUANTITY.match(str(amount)), f"{amount!r} is not a Kubernetes quantity"
        mounts = {m["mountPath"] for m in container.get("volumeMounts") or []}
        assert "/tmp" in mounts, "a writable /tmp on a read-only root filesystem"


def test_features_data_dir_is_writable(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = service_settings("features", monkeypatch)
    mounts = {m["mountPath"] for m in only_container(deployment("features"))["volumeMounts"]}
    data_dir = Path(settings.features_data_dir)
    assert any(data_dir == Path(m) or Path(m) in data_dir.parents for m in mounts), data_dir


def test_single_writer_services_never_overlap() -> None:
    """The monitor's analyzer and the rollout controller must run once: no rolling surge."""
    for component in ("monitor", "rollout"):
        spec = deployment(component)["spec"]
        assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate", component
    assert not any(
        o["spec"]["scaleTargetRef"]["name"] in ("sluiceway-monitor", "sluiceway-rollout")
        for o in of_kind(BASE, "HorizontalPodAutoscaler")
    )


# --- the init job -------------------------------------------------------------------------------


def imported_modules(source: str) -> set[str]:
    """Top-level `import x` / `from x import y` module names of a script."""
    return set(re.findall(r"^(?:from|import)\s+([\w.]+)", source, re.M))


def test_init_job_script_compiles_and_its_imports_resolve() -> None:
    job = named(BASE, "Job", "sluiceway-init")
    assert job is not None
    container = only_container(job)
    assert container["command"] == ["python", "-c"]
    script = container["args"][0]
    compile(script, "sluiceway-init", "exec")
    for module in imported_modules(script):
        assert importlib.util.find_spec(module) is not None, module
    names = {variable["name"] for variable in container["env"]}
    assert set(re.findall(r'os\.environ\["(\w+)"\]', script)) <= names
    assert pod_specs(job)[0]["restartPolicy"] == "OnFailure"
