"""The KubeRay manifests in cluster/: valid against KubeRay's own CRD schemas, and consistent
with the configs they run (GPUs, CPUs, volumes, the dashboard's exposure).

The schemas are the ``openAPIV3Schema`` of the RayCluster and RayJob CustomResourceDefinitions
published by KubeRay, vendored in tests/data/kuberay/ (see NOTICE there) so that a clean clone
can run this. They are checked the way ``kubectl apply --validate=strict`` checks a custom
resource: types, enums, patterns (resource quantities), required fields and no unknown fields.
The CEL rules (``x-kubernetes-validations``) of the CRDs are not evaluated here; none of them
concerns a field these manifests set.
"""
from __future__ import annotations

import copy
import re
import shlex
from functools import lru_cache
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import yaml

from kimivl_rl.config import load_config

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = Path(__file__).resolve().parent / "data" / "kuberay"
CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml")
SHARED_CRD_DIR = REPO.parent / "shared" / "schemas" / "kuberay"
MANIFESTS = sorted((REPO / "cluster").glob("*.yaml"))
# The operator's own name limits (ray-operator/controllers/ray/utils/constant.go): a RayJob's
# cluster is named after it plus 6 characters, and services add up to 10 more.
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47}
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
GPU = "nvidia.com/gpu"

# The CRDs are 2.3 MB of YAML: the C loader reads them in well under a second.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ----------------------------------------------------------------------------- schemas

@lru_cache(maxsize=None)
def _crds() -> dict:
    """(group, kind) -> CRD document."""
    out = {}
    for name in CRD_FILES:
        crd = yaml.load((CRD_DIR / name).read_text(), Loader=_Loader)
        out[(crd["spec"]["group"], crd["spec"]["names"]["kind"])] = crd
    return out


def _strict(node):
    """The CRD schema as a JSON-schema validator should read it.

    ``x-kubernetes-int-or-string`` fields (quantities, ports) take an integer or a string; an
    object with declared properties takes no others (Kubernetes' strict field validation
    rejects unknown fields, where plain JSON schema would let a typo through).
    """
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _strict(value) for key, value in node.items()}
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node and "type" not in node:
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        node["additionalProperties"] = False
    return node


_FORMATS = jsonschema.FormatChecker()
_FORMATS.checks("int32")(lambda v: not isinstance(v, int) or -2**31 <= v < 2**31)
_FORMATS.checks("int64")(lambda v: not isinstance(v, int) or -2**63 <= v < 2**63)


@lru_cache(maxsize=None)
def validator(api_version: str, kind: str) -> jsonschema.Draft4Validator:
    """The validator of the CRD version serving ``apiVersion``/``kind``."""
    group, _, version = api_version.partition("/")
    crd = _crds().get((group, kind))
    if crd is None:
        raise LookupError(f"no KubeRay CRD for kind {kind!r} in group {group!r}")
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version and entry.get("served", False):
            schema = _strict(copy.deepcopy(entry["schema"]["openAPIV3Schema"]))
            return jsonschema.Draft4Validator(schema, format_checker=_FORMATS)
    raise LookupError(f"the {kind} CRD serves no version {version!r}")


def schema_errors(doc: dict) -> list[str]:
    errors = validator(doc.get("apiVersion", ""), doc.get("kind", "")).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


# ----------------------------------------------------------------------------- manifests

def load_manifest(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: expected one document, found {len(docs)}"
    return docs[0]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]   # KubeRay: the first one runs Ray


def worker_groups(doc: dict) -> list[dict]:
    return cluster_spec(doc).get("workerGroupSpecs", [])


def all_groups(doc: dict) -> list[dict]:
    return [cluster_spec(doc)["headGroupSpec"], *worker_groups(doc)]


def quantity(value) -> float:
    """A CPU or count quantity ("64", 8, "500m") as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def group_limit(group: dict, resource: str) -> float:
    limits = ray_container(group).get("resources", {}).get("limits", {})
    return quantity(limits.get(resource, 0))


def group_nodes(group: dict) -> int:
    return group.get("maxReplicas", 0) * group.get("numOfHosts", 1)


def entrypoint_configs(doc: dict) -> list[str]:
    return [t for t in shlex.split(doc["spec"]["entrypoint"])
            if t.startswith("configs/") and t.endswith((".yaml", ".yml"))]


def mounts_covering(container: dict, volumes: list[dict], path: PurePosixPath) -> list[dict]:
    """The volumes (with their mount paths) of ``container`` under which ``path`` lies."""
    by_name = {v["name"]: v for v in volumes}
    return [{"mountPath": m["mountPath"], **by_name[m["name"]]}
            for m in container.get("volumeMounts", [])
            if path == PurePosixPath(m["mountPath"]) or PurePosixPath(m["mountPath"]) in path.parents]


def ids(paths):
    return [p.name for p in paths]


# ----------------------------------------------------------------------------- tests

# sha256 of the CRDs vendored in tests/data/kuberay (the project's reference copy)
VENDORED_SHA256 = {
    "ray.io_rayclusters.yaml": "c44704442eef0c6721ad40c1d66782c8bd3fdab9d3344306a5820910a679baa1",
    "ray.io_rayjobs.yaml": "01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5",
}


def test_vendored_crds_are_the_shared_ones():
    import hashlib

    for name, digest in VENDORED_SHA256.items():
        assert hashlib.sha256((CRD_DIR / name).read_bytes()).hexdigest() == digest, name
    if SHARED_CRD_DIR.is_dir():  # next to the shared notes (not in a clean clone): same bytes
        for name in (*CRD_FILES, "NOTICE"):
            assert (CRD_DIR / name).read_bytes() == (SHARED_CRD_DIR / name).read_bytes(), name


def test_the_expected_manifests_exist():
    assert {"rayjob-tiny-cpu.yaml", "rayjob-gpu-qwen2_5_vl_7b.yaml",
            "raycluster-interactive.yaml"} <= {p.name for p in MANIFESTS}
    assert (REPO / "cluster" / "Dockerfile").is_file()


@pytest.mark.parametrize("path", MANIFESTS, ids=ids(MANIFESTS))
def test_manifest_is_valid_against_the_kuberay_crd(path):
    doc = load_manifest(path)
    assert doc.get("apiVersion") == "ray.io/v1", path.name
    assert doc.get("kind") in MAX_NAME_LENGTH, path.name
    name = (doc.get("metadata") or {}).get("name")
    assert name, f"{path.name}: metadata.name is missing"
    assert DNS_1035_LABEL.match(name) and len(name) <= MAX_NAME_LENGTH[doc["kind"]], name
    assert schema_errors(doc) == [], path.name


def _tiny_job() -> dict:
    return load_manifest(REPO / "cluster" / "rayjob-tiny-cpu.yaml")


def _set_replicas_text(doc):
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"


def _typo_top_level_field(doc):
    doc["spec"]["shutdownAfterJobFinish"] = doc["spec"].pop("shutdownAfterJobFinishes")


def _typo_nested_field(doc):
    ray_container(doc["spec"]["rayClusterSpec"]["headGroupSpec"])["resource"] = {}


def _bad_quantity(doc):
    ray_container(worker_groups(doc)[0])["resources"]["limits"]["memory"] = "16 GB"


def _ray_start_param_not_a_string(doc):
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def _unknown_auth_mode(doc):
    doc["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "password"


def _worker_group_without_name(doc):
    del worker_groups(doc)[0]["groupName"]


def _replicas_beyond_int32(doc):
    worker_groups(doc)[0]["maxReplicas"] = 2**31


BROKEN = [
    (_set_replicas_text, "spec.rayClusterSpec.workerGroupSpecs.0.replicas"),
    (_typo_top_level_field, "spec"),
    (_typo_nested_field, "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0"),
    (_bad_quantity, "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.resources.limits.memory"),
    (_ray_start_param_not_a_string, "spec.rayClusterSpec.headGroupSpec.rayStartParams.num-cpus"),
    (_unknown_auth_mode, "spec.rayClusterSpec.authOptions.mode"),
    (_worker_group_without_name, "spec.rayClusterSpec.workerGroupSpecs.0"),
    (_replicas_beyond_int32, "spec.rayClusterSpec.workerGroupSpecs.0.maxReplicas"),
]


@pytest.mark.parametrize("mutate, where", BROKEN, ids=[m.__name__.strip("_") for m, _ in BROKEN])
def test_the_validator_rejects_a_broken_manifest(mutate, where):
    doc = _tiny_job()
    assert schema_errors(doc) == []
    mutate(doc)
    errors = schema_errors(doc)
    assert any(e.startswith(f"{where}: ") for e in errors), errors


def test_quantities_may_be_integers_or_strings():
    doc = _tiny_job()
    limits = ray_container(worker_groups(doc)[0])["resources"]["limits"]
    limits["cpu"] = 4                # int-or-string: both spellings are valid
    limits["memory"] = "16Gi"
    assert schema_errors(doc) == []


def test_the_wrong_kind_or_version_finds_no_schema():
    with pytest.raises(LookupError):
        validator("ray.io/v1", "RayService")
    with pytest.raises(LookupError):
        validator("ray.io/v2", "RayJob")


RAYJOBS = [p for p in MANIFESTS if load_manifest(p).get("kind") == "RayJob"]


@pytest.mark.parametrize("path", RAYJOBS, ids=ids(RAYJOBS))
def test_rayjob_runs_a_config_of_this_repo(path):
    doc = load_manifest(path)
    assert shlex.split(doc["spec"]["entrypoint"])[:2] == ["kimivl-rl", "run"]
    configs = entrypoint_configs(doc)
    assert configs, f"{path.name}: the entrypoint names no configs/*.yaml"
    for config in configs:
        assert (REPO / config).is_file(), f"{path.name}: {config} is not in the repository"
        load_config(REPO / config)   # and it is a valid config
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    assert doc["spec"]["ttlSecondsAfterFinished"] > 0


@pytest.mark.parametrize("path", RAYJOBS, ids=ids(RAYJOBS))
def test_rayjob_has_the_gpus_and_cpus_its_config_asks_for(path):
    doc = load_manifest(path)
    cfg = load_config(REPO / entrypoint_configs(doc)[0])
    head = cluster_spec(doc)["headGroupSpec"]
    assert group_limit(head, GPU) == 0, "the head has no GPUs"
    gpus = sum(group_nodes(g) * group_limit(g, GPU) for g in worker_groups(doc))
    cpus = sum(group_nodes(g) * group_limit(g, "cpu") for g in worker_groups(doc))
    if cfg.cluster.use_gpu:
        assert gpus >= cfg.sft.num_workers
        assert gpus >= cfg.cluster.num_learners + cfg.rollout.num_workers * cfg.rollout.tensor_parallel_size
    else:
        assert gpus == 0
    driver = doc["spec"].get("entrypointNumCpus", 0)
    rl = (cfg.cluster.num_learners * cfg.cluster.learner_cpus
          + cfg.rollout.num_workers * cfg.cluster.rollout_cpus + cfg.cluster.reward_cpus)
    assert cpus >= driver + max(cfg.sft.num_workers * cfg.sft.cpus_per_worker, rl)


@pytest.mark.parametrize("path", RAYJOBS, ids=ids(RAYJOBS))
def test_rayjob_workers_mount_the_configs_data_and_output_dirs(path):
    doc = load_manifest(path)
    cfg = load_config(REPO / entrypoint_configs(doc)[0])
    head = cluster_spec(doc)["headGroupSpec"]
    for group in worker_groups(doc):
        container = ray_container(group)
        workdir = PurePosixPath(container.get("workingDir", "/"))
        for key, value in (("data.dir", cfg.data.dir), ("output.dir", cfg.output.dir)):
            target = workdir / value   # an absolute value replaces workdir
            found = mounts_covering(container, group["template"]["spec"].get("volumes", []), target)
            assert found, f"{path.name}: {group['groupName']} does not mount {key} {target}"
            claim = found[-1].get("persistentVolumeClaim")
            if claim:
                # A shared volume: the head (where the driver runs) mounts the same claim there.
                on_head = mounts_covering(ray_container(head), head["template"]["spec"].get("volumes", []),
                                          target)
                assert any(m.get("persistentVolumeClaim") == claim for m in on_head), key


@pytest.mark.parametrize("path", MANIFESTS, ids=ids(MANIFESTS))
def test_every_ray_container_has_a_memory_backed_dev_shm(path):
    doc = load_manifest(path)
    for group in all_groups(doc):
        found = mounts_covering(ray_container(group), group["template"]["spec"].get("volumes", []),
                                PurePosixPath("/dev/shm"))
        assert found and found[-1].get("emptyDir", {}).get("medium") == "Memory", path.name


@pytest.mark.parametrize("path", MANIFESTS, ids=ids(MANIFESTS))
def test_dashboard_is_token_protected_and_not_exposed(path):
    doc = load_manifest(path)
    spec = cluster_spec(doc)
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"].get("secretName")
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head.get("enableIngress", False) is False
    host = head["rayStartParams"]["dashboard-host"]
    # A RayJob's operator and submitter reach the dashboard through the head Service; a plain
    # RayCluster keeps the project's default, localhost only.
    assert host == ("0.0.0.0" if doc["kind"] == "RayJob" else "127.0.0.1")


@pytest.mark.parametrize("path", MANIFESTS, ids=ids(MANIFESTS))
def test_one_image_per_manifest_matching_its_hardware(path):
    doc = load_manifest(path)
    images = {c["image"] for g in all_groups(doc) for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1, images
    gpus = sum(group_limit(g, GPU) for g in worker_groups(doc))
    assert images.pop().endswith("-gpu" if gpus else "-cpu")
    assert cluster_spec(doc)["rayVersion"] == "2.60.0"   # requirements/common.txt's Ray
