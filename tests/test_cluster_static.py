"""Deployment assets checked without Docker, Kubernetes or kustomize (none exist here).

What runs for real: the Dockerfile's requirements script on our pyproject.toml, `csl --help`
(the image's health check) and its import footprint, `cluster/ray/submit.sh --dry-run`, and
a small kustomize equivalent (resources + JSON 6902 patches, the only features the overlays
use; anything else is rejected so it cannot be silently ignored) that builds every overlay.

What is static: the Dockerfile, parsed with dockerfile-parse, against the invariants of issue
6 (pinned Ray base matching pyproject, CUDA torch from the matching index, timm and torchvision,
non-root, no credentials, dependency layers before code layers, a `csl --help` health check);
every manifest, before and after the overlays, against `cluster/k8s/schema/` (every field name
KubeRay v1.7.0's CRDs accept, with `additionalProperties: false`, so a misspelt field fails and
a real one such as affinity passes; keyed lists unique by the CRD's list-map keys; names as the
operator requires); sizes, images, Ray versions and run names agreeing across files; no secret
values anywhere; a light submitter placed like the head. The deadlines and /dev/shm budgets
of issue 20 are recomputed in `test_cluster_sizing.py`.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
import re
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
K8S = CLUSTER / "k8s"
SCHEMA = json.loads((K8S / "schema" / "kuberay-v1-subset.schema.json").read_text())
OVERLAY_GPUS = {"small": 1, "gpu8": 8, "gpu64": 64}
SECRET_NAME = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|AUTH)", re.I)
SECRET_VALUE = [
    re.compile(r"AKIA[0-9A-Z]{16}"),                                          # AWS access key id
    re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{30,}"),  # AWS secret
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"ghp_[A-Za-z0-9]{30,}"),
]


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _pin(name: str) -> str:
    for req in _pyproject()["dependencies"]:
        m = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==([\w.]+)", req.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError(f"pyproject.toml does not pin {name} with ==")


# ---------------------------------------------------------------------------------------
# Dockerfile


@pytest.fixture(scope="module")
def dockerfile():
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(path=str(REPO / "Dockerfile"))
    return parser


def _instructions(parser, name: str) -> list[dict[str, Any]]:
    return [i for i in parser.structure if i["instruction"] == name]


def _args(parser) -> dict[str, str]:
    out = {}
    for i in _instructions(parser, "ARG"):
        k, _, v = i["value"].partition("=")
        out[k.strip()] = v.strip().strip('"')
    return out


def test_dockerfile_base_is_pinned_ray_image_matching_pyproject(dockerfile):
    froms = _instructions(dockerfile, "FROM")
    assert len(froms) == 1, "one stage expected: a second FROM would need the checks below per stage"
    m = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)-cu(?P<cu>\d+)(@sha256:[0-9a-f]{64})?",
                     froms[0]["value"].strip())
    assert m, f"base must be rayproject/ray:<version>-py<xy>-cu<xyz>[@sha256:...], got {froms[0]['value']!r}"
    assert m["ray"] == _pin("ray"), "head and workers refuse to join across Ray versions"
    assert m["py"] == "311" and _pyproject()["requires-python"] == ">=3.11"
    args = _args(dockerfile)
    assert args["TORCH_VERSION"] == _pin("torch")
    assert args["TORCH_INDEX_URL"].rstrip("/").endswith(f"/cu{m['cu']}"), "torch's CUDA must be the base's CUDA"
    tv_minor = int(args["TORCHVISION_VERSION"].split(".")[1])
    assert tv_minor == int(_pin("torch").split(".")[1]) + 15, "torchvision 0.(N+15) pairs with torch 2.N"


def test_requirements_script_gives_runtime_deps(tmp_path):
    out = subprocess.run([sys.executable, str(CLUSTER / "docker" / "requirements_from_pyproject.py"),
                          str(REPO / "pyproject.toml")], capture_output=True, text=True, check=True).stdout.split()
    names = {re.split(r"[\[=<>!~ ]", r, maxsplit=1)[0] for r in out}
    assert {"timm", "torchvision", "torch", "deepspeed", "ray"} <= names
    assert f"torch=={_pin('torch')}" in out
    assert "pytest" not in names, "test extra must stay out of the image"
    bad = subprocess.run([sys.executable, str(CLUSTER / "docker" / "requirements_from_pyproject.py"),
                          str(REPO / "pyproject.toml"), "gpuu"], capture_output=True, text=True)
    assert bad.returncode != 0 and "gpuu" in bad.stderr


def test_dockerfile_installs_dependencies_before_code(dockerfile):
    steps = dockerfile.structure
    code_dirs = ("data_shards", "trainer")

    def index(pred, what):
        hits = [n for n, i in enumerate(steps) if pred(i)]
        assert hits, f"no {what} in Dockerfile"
        return hits

    pyproject_copy = index(lambda i: i["instruction"] == "COPY" and "pyproject.toml" in i["value"], "COPY of pyproject.toml")[0]
    torch_run = index(lambda i: i["instruction"] == "RUN" and "torch==" in i["value"], "torch install")[0]
    deps_run = index(lambda i: i["instruction"] == "RUN" and "requirements_from_pyproject.py pyproject.toml >" in i["value"],
                     "install of pyproject's runtime deps")[0]
    code_copies = index(lambda i: i["instruction"] == "COPY" and any(d in i["value"].split() or f"{d}/" in i["value"] for d in code_dirs),
                        "COPY of the code")
    assert torch_run < deps_run and pyproject_copy < deps_run < min(code_copies)
    assert "-r /tmp/requirements.txt" in steps[deps_run]["value"]
    # Nothing that copies code may precede a dependency install, and every install after
    # the code arrives must leave dependencies alone.
    for i in steps[min(code_copies):]:
        if i["instruction"] == "RUN" and "pip install" in i["value"]:
            assert "--no-deps" in i["value"], f"pip install after the code COPY without --no-deps: {i['content']}"
    for i in steps[:min(code_copies)]:
        if i["instruction"] in ("COPY", "ADD"):
            srcs = i["value"].split()[:-1]
            assert not any(s in (".", "./") for s in srcs), f"copying the whole context before deps: {i['content']}"


def test_dockerfile_non_root_no_credentials_health_check(dockerfile):
    users = [i["value"].strip() for i in _instructions(dockerfile, "USER")]
    assert users and all(u.split(":")[0] not in ("root", "0") for u in users), users
    assert users[-1] == "ray", "the image must end as Ray's `ray` user (KubeRay and Ray images expect it)"
    for inst in _instructions(dockerfile, "ENV") + _instructions(dockerfile, "ARG"):
        names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", inst["value"]) or [inst["value"].split()[0]]
        for name in names:
            assert not SECRET_NAME.search(name), f"credential-like {inst['instruction']} {name} in the Dockerfile"
    text = (REPO / "Dockerfile").read_text()
    for pat in SECRET_VALUE:
        assert not pat.search(text)
    assert not re.search(r"(\.aws|\.ssh|\.netrc|credentials)", " ".join(i["value"] for i in _instructions(dockerfile, "COPY")))
    hc = _instructions(dockerfile, "HEALTHCHECK")
    assert len(hc) == 1 and "csl --help" in hc[0]["value"]
    assert not _instructions(dockerfile, "ENTRYPOINT"), "KubeRay sets the container command; an ENTRYPOINT would wrap it"


def _dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    for pat in patterns:
        p = pat.removeprefix("**/")
        if fnmatch.fnmatch(path, pat) or any(fnmatch.fnmatch("/".join(parts[: k + 1]), p) or fnmatch.fnmatch(parts[k], p)
                                             for k in range(len(parts))):
            return True
    return False


def test_dockerignore_and_copied_paths(dockerfile):
    patterns = _dockerignore()
    for must in (".venv", "runs", "data", ".git"):
        assert must in patterns, f".dockerignore must exclude {must}"
    for inst in _instructions(dockerfile, "COPY"):
        srcs = [s for s in inst["value"].split()[:-1] if not s.startswith("--")]
        for src in srcs:
            assert (REPO / src).exists(), f"COPY source {src} missing from the repository"
            assert not _ignored(src, patterns), f"COPY source {src} is excluded by .dockerignore"


def test_csl_help_is_a_cheap_health_check():
    """The HEALTHCHECK runs `csl --help`: it must succeed and import no torch/ray/deepspeed."""
    t0 = time.time()
    res = subprocess.run([str(Path(sys.executable).parent / "csl"), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "train" in res.stdout
    probe = "import sys, trainer.cli; print(sorted(m for m in ('torch', 'ray', 'deepspeed', 'timm') if m in sys.modules))"
    heavy = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO).stdout.strip()
    assert heavy == "[]", f"`csl --help` imports {heavy}: the health check would take seconds and GBs"
    assert time.time() - t0 < 60


# ---------------------------------------------------------------------------------------
# a small kustomize: resources + JSON 6902 patches


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), f"JSON pointer must start with '/': {path!r}"
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, parts: list[str], path: str) -> tuple[Any, str]:
    node = doc
    for p in parts[:-1]:
        try:
            node = node[int(p)] if isinstance(node, list) else node[p]
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"JSON patch path {path!r}: {p!r} not found") from None
    return node, parts[-1]


def apply_json6902(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 add/replace/remove/test, enough for kustomize's JSON patches."""
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, path = op["op"], op["path"]
        parent, key = _parent(doc, _pointer(path), path)
        if isinstance(parent, list):
            if kind == "add" and key == "-":
                parent.append(copy.deepcopy(op["value"]))
                continue
            idx = int(key)
            if not (0 <= idx < len(parent) + (kind == "add")):
                raise ValueError(f"JSON patch path {path!r}: index {idx} out of range")
            if kind == "add":
                parent.insert(idx, copy.deepcopy(op["value"]))
            elif kind == "replace":
                parent[idx] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[idx]
            elif kind == "test":
                assert parent[idx] == op["value"], f"JSON patch test failed at {path}"
            else:
                raise ValueError(f"unsupported JSON patch op {kind!r}")
        else:
            if kind in ("replace", "remove", "test") and key not in parent:
                raise ValueError(f"JSON patch {kind} {path!r}: no such field")
            if kind in ("add", "replace"):
                parent[key] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[key]
            elif kind == "test":
                assert parent[key] == op["value"], f"JSON patch test failed at {path}"
            else:
                raise ValueError(f"unsupported JSON patch op {kind!r}")
    return doc


def _matches(doc: dict[str, Any], target: dict[str, Any]) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    return (target.get("kind", doc["kind"]) == doc["kind"] and target.get("name", doc["metadata"]["name"]) == doc["metadata"]["name"]
            and target.get("group", group) == group and target.get("version", version) == version)


def kustomize_build(folder: Path) -> list[dict[str, Any]]:
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unsupported = set(k) - {"apiVersion", "kind", "resources", "patches"}
    assert not unsupported, f"{folder}: this test's kustomize does not implement {sorted(unsupported)}"
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    docs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        p = (folder / res).resolve()
        docs += kustomize_build(p) if p.is_dir() else [d for d in yaml.safe_load_all(p.read_text()) if d]
    for patch in k.get("patches", []):
        assert set(patch) <= {"target", "patch", "path"}, patch
        ops = yaml.safe_load(patch["patch"] if "patch" in patch else (folder / patch["path"]).read_text())
        assert isinstance(ops, list), f"{folder}: only JSON 6902 patches (a list of ops) are used here"
        hits = [n for n, d in enumerate(docs) if _matches(d, patch["target"])]
        assert len(hits) == 1, f"{folder}: patch target {patch['target']} matched {len(hits)} resources"
        docs[hits[0]] = apply_json6902(docs[hits[0]], ops)
    return docs


def test_json6902_applier():
    doc = {"a": {"b/c": [1, 2]}, "d": 1}
    out = apply_json6902(doc, [{"op": "add", "path": "/a/b~1c/-", "value": 3},
                               {"op": "replace", "path": "/d", "value": 2},
                               {"op": "add", "path": "/a/b~1c/0", "value": 0},
                               {"op": "remove", "path": "/a/b~1c/1"}])
    assert out == {"a": {"b/c": [0, 2, 3]}, "d": 2} and doc["d"] == 1
    with pytest.raises(ValueError, match="no such field"):
        apply_json6902(doc, [{"op": "replace", "path": "/e", "value": 1}])
    with pytest.raises(ValueError, match="not found"):
        apply_json6902(doc, [{"op": "add", "path": "/x/y", "value": 1}])


# ---------------------------------------------------------------------------------------
# manifests


def _list_map_keys(validator, keys: list[str], instance: Any, schema: dict[str, Any]):
    """The API server's rule for `x-kubernetes-list-type: map`: one entry per key; a missing key
    takes the item schema's default (a port without protocol is TCP)."""
    if not validator.is_type(instance, "array"):
        return
    items = schema.get("items", {})
    if "$ref" in items:
        items = SCHEMA["$defs"][items["$ref"].rsplit("/", 1)[1]]
    defaults = {k: v.get("default") for k, v in items.get("properties", {}).items()}
    seen: dict[tuple, int] = {}
    for i, item in enumerate(instance):
        if isinstance(item, dict):
            key = tuple(item.get(k, defaults.get(k)) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(
                    f"entries {seen[key]} and {i} share the key {dict(zip(keys, key))} (x-kubernetes-list-map-keys)")
            seen.setdefault(key, i)


KubeValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"x-kubernetes-list-map-keys": _list_map_keys})


@functools.cache
def _validator(kind: str):
    schema = {"$ref": f"#/$defs/{kind}", "$defs": SCHEMA["$defs"]}
    KubeValidator.check_schema(schema)
    return KubeValidator(schema)


def _validate(doc: dict[str, Any], where: str) -> None:
    kind = doc.get("kind")
    assert kind in SCHEMA["$defs"], f"{where}: no schema for kind {kind!r}"
    e = jsonschema.exceptions.best_match(_validator(kind).iter_errors(doc))
    if e is not None:
        raise AssertionError(f"{where}: {e.message} at /{'/'.join(map(str, e.absolute_path))}")


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def _builds() -> dict[str, list[dict[str, Any]]]:
    out = {"base": kustomize_build(K8S / "base")}
    for name in OVERLAY_GPUS:
        out[name] = kustomize_build(K8S / "overlays" / name)
    return out


def test_every_yaml_under_cluster_parses():
    files = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))
    assert len(files) >= 8
    for f in files:
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), f"{f}: expected YAML mappings"


def test_manifests_and_overlays_match_kuberay_schema():
    for f in _manifest_files():
        for doc in yaml.safe_load_all(f.read_text()):
            _validate(doc, str(f.relative_to(REPO)))
    assert set(OVERLAY_GPUS) == {p.name for p in (K8S / "overlays").iterdir() if p.is_dir()}
    for name, docs in _builds().items():
        assert [d["kind"] for d in docs].count("RayJob") == 1
        for doc in docs:
            _validate(doc, f"kustomize build {name}")


def test_schema_rejects_typos_and_missing_fields():
    job = yaml.safe_load((K8S / "base" / "rayjob.yaml").read_text())
    typo = copy.deepcopy(job)
    typo["spec"]["shutdownAfterJobFinished"] = typo["spec"].pop("shutdownAfterJobFinishes")
    with pytest.raises(AssertionError, match="shutdownAfterJobFinished"):
        _validate(typo, "typo")
    nested = copy.deepcopy(job)
    nested["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["tolerations"][0]["efect"] = "NoSchedule"
    with pytest.raises(AssertionError, match="efect"):
        _validate(nested, "nested typo")
    inline = copy.deepcopy(job)
    inline["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"][0] = {
        "name": "AWS_ACCESS_KEY_ID", "value": "x", "valueFrom": {"secretKeyRef": {"name": "a", "key": "b"}}}
    with pytest.raises(AssertionError):
        _validate(inline, "value and valueFrom")


def _head_spec(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]


def _worker_spec(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]


def test_schema_refuses_duplicate_keys_and_names_the_operator_refuses():
    job = yaml.safe_load((K8S / "base" / "rayjob.yaml").read_text())
    cluster = yaml.safe_load((K8S / "interactive" / "raycluster.yaml").read_text())
    cases: list[tuple[str, str, dict[str, Any]]] = []

    def variant(label: str, why: str, doc: dict[str, Any] = job) -> dict[str, Any]:
        cases.append((label, why, copy.deepcopy(doc)))
        return cases[-1][2]

    dup, pattern, long = "share the key", "does not match", "is too long"
    head_c = lambda d: _head_spec(d)["containers"][0]  # noqa: E731
    head_c(variant("env name twice", dup))["env"].append({"name": "AWS_DEFAULT_REGION", "value": "eu-west-1"})
    _head_spec(variant("container name twice", dup))["containers"].append({"name": "ray-head", "image": "busybox"})
    head_c(variant("mountPath twice", dup))["volumeMounts"].append({"name": "ray-logs", "mountPath": "/dev/shm"})
    # 6379 is listed without protocol, which the API server defaults to TCP before comparing
    head_c(variant("port+protocol twice", dup))["ports"].append({"name": "gcs2", "containerPort": 6379, "protocol": "TCP"})
    _head_spec(variant("volume name twice", dup))["volumes"].append({"name": "dshm", "emptyDir": {}})
    variant("worker group twice", dup)["spec"]["rayClusterSpec"]["workerGroupSpecs"] *= 2
    variant("RayJob name with a leading digit", pattern)["metadata"]["name"] = "8gpu-oi-v6"
    variant("RayJob name of 48 characters", long)["metadata"]["name"] = "a" * 48
    variant("RayJob name with a dot", pattern)["metadata"]["name"] = "oi.v6"
    variant("RayCluster name of 54 characters", long, cluster)["metadata"]["name"] = "a" * 54
    head_c(variant("container name not DNS-1123", pattern))["name"] = "Ray_Head"
    head_c(variant("port name over 15 characters", long))["ports"][0]["name"] = "gcs-server-port-x"
    head_c(variant("unknown resource name", pattern))["resources"]["limits"]["memroy"] = "1Gi"
    head_c(variant("bare resource name", pattern))["resources"]["limits"]["gpu"] = "1"
    _head_spec(variant("volume with two sources", "too many properties"))["volumes"][0]["persistentVolumeClaim"] = {
        "claimName": "x"}
    variant("preRunningDeadlineSeconds 0", "less than the minimum")["spec"]["preRunningDeadlineSeconds"] = 0
    variant("activeDeadlineSeconds over int32", "greater than the maximum")["spec"]["activeDeadlineSeconds"] = 2**31
    variant("object-store-memory with a unit", pattern)["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"][
        "object-store-memory"] = "4Gi"
    variant("neither rayClusterSpec nor clusterSelector", "not valid under any")["spec"].pop("rayClusterSpec")
    for label, why, doc in cases:
        with pytest.raises(AssertionError, match=why):
            _validate(doc, label)
            pytest.fail(f"schema accepted: {label}")
    # the same port on another protocol is a different entry
    ok = copy.deepcopy(job)
    assert "protocol" not in head_c(ok)["ports"][0] and head_c(ok)["ports"][0]["containerPort"] == 6379
    head_c(ok)["ports"].append({"name": "gcs-udp", "containerPort": 6379, "protocol": "UDP"})
    _validate(ok, "6379/UDP beside 6379/TCP")


def test_schema_accepts_real_fields_users_add():
    """Open where KubeRay's CRD is open: these are real fields and must not fail our check."""
    job = yaml.safe_load((K8S / "base" / "rayjob.yaml").read_text())
    worker = _worker_spec(job)
    worker["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]}]}]}}}
    worker["topologySpreadConstraints"] = [
        {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule"}]
    worker["priorityClassName"] = "gpu-batch"
    worker["imagePullSecrets"] = [{"name": "ghcr"}]
    worker["initContainers"] = [{"name": "warm-cache", "image": "busybox", "command": ["true"]}]
    c = worker["containers"][0]
    c["envFrom"] = [{"configMapRef": {"name": "csl-env"}}]
    c["env"].append({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    c["livenessProbe"] = {"exec": {"command": ["bash", "-c", "ray health-check"]}, "periodSeconds": 30}
    c["readinessProbe"] = {"httpGet": {"path": "/", "port": 52365}}
    c["startupProbe"] = {"tcpSocket": {"port": 6379}}
    for side in ("requests", "limits"):
        c["resources"][side]["vpc.amazonaws.com/efa"] = "4"
        c["resources"][side]["hugepages-2Mi"] = "1Gi"
    c["securityContext"] = {"readOnlyRootFilesystem": False, "capabilities": {"add": ["IPC_LOCK"]}}
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["idleTimeoutSeconds"] = 60
    job["spec"]["entrypointResources"] = '{"head": 1}'
    _validate(job, "real fields")
    existing = copy.deepcopy(job)
    existing["spec"].pop("rayClusterSpec")
    existing["spec"]["clusterSelector"] = {"ray.io/cluster": "csl-interactive"}
    _validate(existing, "a RayJob on an existing cluster")


def _pod_volumes_check(tpl: dict[str, Any], where: str) -> None:
    vols = {v["name"] for v in tpl["spec"].get("volumes", [])}
    for c in _containers(tpl):
        for m in c.get("volumeMounts", []):
            assert m["name"] in vols, f"{where}: {c['name']} mounts volume {m['name']!r}, which the pod does not define"


def test_every_mount_has_its_volume():
    for build, docs in _builds().items():
        for doc in docs:
            if doc["kind"] == "RayJob":
                for tpl in _all_pod_templates(doc) + [doc["spec"]["submitterPodTemplate"]]:
                    _pod_volumes_check(tpl, f"kustomize build {build}")
    for tpl in _all_pod_templates(yaml.safe_load((K8S / "interactive" / "raycluster.yaml").read_text())):
        _pod_volumes_check(tpl, "interactive")


def test_submitter_is_light_and_placed_like_the_head():
    """KubeRay's default submitter runs on the head's CUDA image with no security context."""
    for build, docs in _builds().items():
        job = next(d for d in docs if d["kind"] == "RayJob")
        where = f"kustomize build {build}"
        sub = job["spec"]["submitterPodTemplate"]["spec"]
        head = _head_spec(job)
        assert sub.get("restartPolicy") in ("Never", "OnFailure"), (
            f"{where}: a Job's pod template needs restartPolicy Never or OnFailure")
        for field in ("securityContext", "tolerations", "nodeSelector", "affinity"):
            assert sub.get(field) == head.get(field), f"{where}: the submitter's {field} differs from the head's"
        c = sub["containers"][0]
        m = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)-cpu(@sha256:[0-9a-f]{64})?", c["image"])
        assert m, f"{where}: submitter image {c['image']!r} is not Ray's CPU image"
        assert m["ray"] == _pin("ray") == job["spec"]["rayClusterSpec"]["rayVersion"], (
            f"{where}: `ray job submit` must be the cluster's Ray version")
        assert m["py"] == "311"
        assert "command" not in c and "args" not in c, f"{where}: KubeRay supplies the submit command"
        res = c["resources"]
        assert _quantity_bytes(res["requests"]["memory"]) <= 512 * 2**20 and _cpu(res["requests"]["cpu"]) <= 0.5, where
        assert _quantity_bytes(res["limits"]["memory"]) >= 512 * 2**20, f"{where}: an OOM-killed submitter costs a retry"
        assert not any("valueFrom" in e for e in c.get("env", [])), f"{where}: the submitter needs no credentials"
        assert c["securityContext"]["allowPrivilegeEscalation"] is False


_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _quantity_bytes(q: str | int) -> int:
    m = re.fullmatch(r"(\d+)(|k|M|G|T|Ki|Mi|Gi|Ti)", str(q))
    assert m, f"quantity {q!r}: this test reads whole numbers with a unit only"
    return int(m[1]) * _UNITS[m[2]]


def _cpu(q: str | int) -> float:
    return int(str(q)[:-1]) / 1000 if str(q).endswith("m") else float(q)


def _entrypoint_config(job: dict[str, Any]):
    from trainer.config import load_config

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["csl", "pipeline", "--config"], argv
    overrides = argv[4:]
    assert all("=" in o for o in overrides), overrides
    return load_config(argv[3], overrides), dict(o.split("=", 1) for o in overrides)


def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["spec"]["containers"]


def _all_pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    return [spec["headGroupSpec"]["template"]] + [w["template"] for w in spec.get("workerGroupSpecs", [])]


def test_rayjob_sizes_and_names_agree():
    names = {}
    for build, docs in _builds().items():
        job = next(d for d in docs if d["kind"] == "RayJob")
        cfg, overrides = _entrypoint_config(job)
        spec, where = job["spec"], f"kustomize build {build}"
        run = cfg.run.name
        assert job["metadata"]["name"] == run == job["metadata"]["labels"]["csl-train/run-name"], where
        assert len(run) <= 40, f"{where}: KubeRay appends suffixes to the RayJob name for its cluster and pods"
        names[build] = run
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert spec["backoffLimit"] >= 1, "a retry (new RayCluster) resumes from run.storage: allow some"
        assert "cluster.workers" in overrides, f"{where}: the size must be explicit in the entrypoint"
        assert spec["rayClusterSpec"]["rayVersion"] == _pin("ray")
        workers = spec["rayClusterSpec"]["workerGroupSpecs"]
        assert len(workers) == 1
        w = workers[0]
        assert w["minReplicas"] <= w["replicas"] == w["maxReplicas"], f"{where}: replicas within min..max"
        res = _containers(w["template"])[0]["resources"]
        gpus = int(res["limits"]["nvidia.com/gpu"])
        assert res["requests"].get("nvidia.com/gpu", res["limits"]["nvidia.com/gpu"]) == res["limits"]["nvidia.com/gpu"]
        assert cfg.cluster.gpus_per_worker == 1
        assert w["replicas"] * gpus == cfg.cluster.workers * cfg.cluster.gpus_per_worker, (
            f"{where}: {w['replicas']} pods x {gpus} GPUs != cluster.workers={cfg.cluster.workers}")
        if build in OVERLAY_GPUS:
            assert cfg.cluster.workers == OVERLAY_GPUS[build], where
        # an elastic group (Ray Train between min_workers and workers) on nodes KubeRay may lose
        lo = cfg.cluster.min_workers or cfg.cluster.workers
        assert w["minReplicas"] * gpus == lo, f"{where}: minReplicas x GPUs != cluster.min_workers={lo}"
        assert (cfg.data.lanes or cfg.cluster.workers) % lo == 0, f"{where}: min_workers must divide data.lanes"
        assert float(res["limits"]["cpu"]) >= gpus * cfg.cluster.cpus_per_worker, f"{where}: too few CPUs per pod"
        pod = w["template"]["spec"]
        assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        head_res = _containers(spec["rayClusterSpec"]["headGroupSpec"]["template"])[0]["resources"]
        assert "nvidia.com/gpu" not in head_res.get("limits", {}), f"{where}: the head needs no GPU"
        for tpl in _all_pod_templates(job):
            assert tpl["spec"]["securityContext"]["runAsNonRoot"] is True
            assert "requests" in _containers(tpl)[0]["resources"]
        _check_storage(build, docs, job, cfg.run.storage)
    assert len(set(names[b] for b in OVERLAY_GPUS)) == len(OVERLAY_GPUS), (
        f"overlays must not share a run name (a different world size cannot resume it): {names}")


def _check_storage(build: str, docs: list[dict[str, Any]], job: dict[str, Any], storage: str) -> None:
    if storage.startswith("s3://"):
        return
    assert storage.startswith("/"), f"kustomize build {build}: run.storage {storage!r} is neither s3:// nor a mounted path"
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for tpl in _all_pod_templates(job):
        vols = {v["name"]: v for v in tpl["spec"].get("volumes", [])}
        mounts = [m for m in _containers(tpl)[0].get("volumeMounts", []) if storage.startswith(m["mountPath"])]
        assert mounts, f"kustomize build {build}: {storage} is not mounted in every pod"
        claim = vols[mounts[0]["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim in claims and "ReadWriteMany" in claims[claim]["spec"]["accessModes"], (
            f"kustomize build {build}: run folders on a PVC need a ReadWriteMany claim in the build")


def test_images_and_ray_versions_agree_across_files():
    version = _pyproject()["version"]
    images = set()
    for f in _manifest_files():
        for doc in yaml.safe_load_all(f.read_text()):
            if doc["kind"] in ("RayJob", "RayCluster"):
                spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
                assert spec["rayVersion"] == _pin("ray"), f
                for tpl in _all_pod_templates(doc):
                    images |= {c["image"] for c in _containers(tpl)}
    for docs in _builds().values():
        for doc in docs:
            if doc["kind"] == "RayJob":
                images |= {c["image"] for tpl in _all_pod_templates(doc) for c in _containers(tpl)}
    assert len(images) == 1, f"one image everywhere, got {images}"
    image = images.pop()
    assert image.rsplit(":", 1)[1] == version, f"image tag must be the package version {version}"
    assert f'org.opencontainers.image.version="{version}"' in (REPO / "Dockerfile").read_text()
    for doc in (CLUSTER / "README.md", K8S / "README.md"):
        for tag in re.findall(r"csl-train:(\d+\.\d+\.\d+)", doc.read_text()):
            assert tag == version, f"{doc} mentions csl-train:{tag}, not {version}"


def _walk(node: Any):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_no_secret_values_inline():
    files = [p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    files += [REPO / "Dockerfile", REPO / ".dockerignore"]
    for f in files:
        text = f.read_text()
        for pat in SECRET_VALUE:
            assert not pat.search(text), f"{f}: looks like a credential ({pat.pattern})"
    for f in sorted(CLUSTER.rglob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            assert doc.get("kind") != "Secret", f"{f}: Secrets are created out of band, never committed"
            for node in _walk(doc):
                if isinstance(node.get("name"), str) and ("value" in node or "valueFrom" in node):
                    if SECRET_NAME.search(node["name"]):
                        assert "value" not in node and "secretKeyRef" in node.get("valueFrom", {}), (
                            f"{f}: {node['name']} must come from a Secret")
            env_vars = doc.get("env_vars", {}) if "env_vars" in doc else {}
            for name in env_vars:
                assert not SECRET_NAME.search(name), f"{f}: runtime_env is stored in GCS and shown in the dashboard: no {name}"
    # head and workers of the RayJob read the same variables
    job = yaml.safe_load((K8S / "base" / "rayjob.yaml").read_text())
    envs = [_containers(t)[0]["env"] for t in _all_pod_templates(job)]
    assert all(e == envs[0] for e in envs)


# ---------------------------------------------------------------------------------------
# cluster/ray


def test_runtime_env_fields():
    env = yaml.safe_load((CLUSTER / "ray" / "runtime_env.yaml").read_text())
    known = {"working_dir", "excludes", "env_vars", "py_modules", "pip", "uv", "conda", "config", "py_executable", "image_uri"}
    assert set(env) <= known, set(env) - known
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "runtime_env env_vars must be strings"
    for must in (".git", ".venv", "runs", "data"):
        assert must in env["excludes"]


def test_submit_script_dry_run():
    script = CLUSTER / "ray" / "submit.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    res = subprocess.run(["bash", str(script), "--dry-run", "--address", "http://head:8265", "openimages-v6-tresnet-m",
                          "oi-try", "run.storage=s3://csl-runs", "cluster.workers=8"],
                         capture_output=True, text=True, cwd=REPO, check=True)
    argv = shlex.split(res.stdout)
    assert argv[:3] == ["ray", "job", "submit"]
    sep = argv.index("--")
    assert argv[sep + 1:] == ["csl", "pipeline", "--config", "openimages-v6-tresnet-m", "run.name=oi-try",
                              "run.storage=s3://csl-runs", "cluster.workers=8"]
    opts = argv[3:sep]
    assert opts[opts.index("--working-dir") + 1] == "."
    assert opts[opts.index("--address") + 1] == "http://head:8265"
    assert re.fullmatch(r"oi-try-\d{8}-\d{6}", opts[opts.index("--submission-id") + 1])
    bad = subprocess.run(["bash", str(script), "--dry-run", "x", "y", "run.name=z"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "run name" in bad.stderr
