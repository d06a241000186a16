"""Every manifest and YAML in cluster/ and serving/: parsed, schema-checked, and consistent with
the repository (images, Ray version, entrypoints, recipes, volumes, secrets, auth defaults)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
IMAGE_ROOT = "/app"  # where cluster/Dockerfile puts the repository
IMAGE_NAME = "rayembed:0.1.0"
K8S_VERSION = "1.30"
KUBERAY_KINDS = {"RayCluster", "RayJob", "RayService"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_k8s_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p)]


def _in_repo(path: str) -> Path:
    """A path inside the image (/app/...) mapped to the checkout."""
    assert path.startswith(IMAGE_ROOT + "/"), f"{path} is not under {IMAGE_ROOT}/ (the image's repository)"
    return REPO / path[len(IMAGE_ROOT) + 1 :]


def _ray_version_of_image() -> str:
    m = re.search(r"^FROM rayproject/ray:([0-9.]+)-", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert m, "cluster/Dockerfile must build FROM rayproject/ray:<version>-..."
    return m.group(1)


def _cluster_specs(doc: dict) -> list[dict]:
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        return [spec]
    if doc["kind"] == "RayJob":
        return [spec["rayClusterSpec"]] if "rayClusterSpec" in spec else []
    return [spec["rayClusterConfig"]]


def _groups(cspec: dict) -> list[tuple[str, dict]]:
    return [("head", cspec["headGroupSpec"])] + [(g["groupName"], g) for g in cspec["workerGroupSpecs"]]


def _gpus(container: dict) -> int:
    limits = container.get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def test_every_file_parses_and_kinds_are_known():
    docs = _all_k8s_docs()
    kinds = sorted(d["kind"] for _, d in docs)
    assert kinds.count("RayCluster") == 1 and kinds.count("RayService") == 1
    assert "PersistentVolumeClaim" in kinds
    for path, d in docs:
        assert {"apiVersion", "kind", "metadata", "spec"} <= d.keys(), path
        if d["kind"] in KUBERAY_KINDS:
            assert d["apiVersion"] == "ray.io/v1", path


def test_core_kinds_validate_against_kubernetes_schemas():
    import kubernetes_validate

    core = [(p, d) for p, d in _all_k8s_docs() if d["kind"] not in KUBERAY_KINDS]
    assert core
    for _path, d in core:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)


def test_pod_templates_validate_as_kubernetes_pod_templates():
    """KubeRay embeds plain pod templates: validate each one with the Kubernetes schema."""
    import kubernetes_validate

    n = 0
    for _path, d in _all_k8s_docs():
        if d["kind"] not in KUBERAY_KINDS:
            continue
        for cspec in _cluster_specs(d):
            for name, group in _groups(cspec):
                wrapped = {"apiVersion": "v1", "kind": "PodTemplate",
                           "metadata": {"name": f"{d['metadata']['name']}-{name}"}, "template": group["template"]}
                kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
                n += 1
    assert n >= 10


def test_invalid_pod_template_is_caught():
    """The check above has teeth: a misspelt container field fails strict validation."""
    import kubernetes_validate

    bad = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
           "template": {"spec": {"containers": [{"name": "c", "image": "i", "imagePullPolicyy": "Always"}]}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_kuberay_cluster_specs_are_structurally_sound():
    import ray

    ray_version = _ray_version_of_image()
    assert ray.__version__ == ray_version, "the image's Ray must match the Ray the package is tested with"
    claims = {d["metadata"]["name"] for _, d in _all_k8s_docs() if d["kind"] == "PersistentVolumeClaim"}
    for path, d in _all_k8s_docs():
        if d["kind"] not in KUBERAY_KINDS:
            continue
        for cspec in _cluster_specs(d):
            where = f"{path.name}:{d['metadata']['name']}"
            assert cspec["rayVersion"] == ray_version, where
            assert cspec.get("authOptions", {}).get("mode") == "token", f"{where}: token auth must be on"
            names = [n for n, _ in _groups(cspec)]
            assert len(names) == len(set(names)), where
            for name, group in _groups(cspec):
                assert isinstance(group["rayStartParams"], dict), where
                assert all(isinstance(v, str) for v in group["rayStartParams"].values()), f"{where}/{name}"
                pod = group["template"]["spec"]
                containers = pod["containers"]
                assert containers[0]["image"].rsplit("/", 1)[-1] == IMAGE_NAME, f"{where}/{name}"
                volumes = {v["name"]: v for v in pod.get("volumes", [])}
                for c in containers:
                    for m in c.get("volumeMounts", []):
                        assert m["name"] in volumes, f"{where}/{name}: mount {m['name']} has no volume"
                for v in volumes.values():
                    if "persistentVolumeClaim" in v:
                        assert v["persistentVolumeClaim"]["claimName"] in claims, f"{where}/{name}"
                if name != "head":
                    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{where}/{name}"
                    if _gpus(containers[0]):
                        tol = [t.get("key") for t in pod.get("tolerations", [])]
                        assert "nvidia.com/gpu" in tol, f"{where}/{name}: GPU pods need the GPU toleration"
                else:
                    ports = {p["containerPort"] for p in containers[0].get("ports", [])}
                    assert {6379, 8265} <= ports, where


def test_raycluster_has_cpu_head_and_autoscaling_gpu_group():
    (d,) = [d for _, d in _all_k8s_docs() if d["kind"] == "RayCluster"]
    spec = d["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert _gpus(head) == 0
    gpu_groups = [g for g in spec["workerGroupSpecs"] if _gpus(g["template"]["spec"]["containers"][0])]
    assert gpu_groups and any(g["minReplicas"] < g["maxReplicas"] for g in gpu_groups)


def _rayjobs() -> dict[str, dict]:
    return {Path(shlex.split(d["spec"]["entrypoint"])[1]).stem: d for _, d in _all_k8s_docs() if d["kind"] == "RayJob"}


def test_rayjobs_cover_synth_train_index_and_name_real_entrypoints_and_recipes():
    from ray.runtime_env import RuntimeEnv

    from rayembed.cluster.submit import _relative_outputs
    from rayembed.config import load_config, to_dict

    cluster_names = {d["metadata"]["name"] for _, d in _all_k8s_docs() if d["kind"] == "RayCluster"}
    jobs = _rayjobs()
    assert {"synth", "train", "index"} <= jobs.keys()
    for job, d in jobs.items():
        spec = d["spec"]
        argv = shlex.split(spec["entrypoint"])
        assert argv[0] == "python"
        assert _in_repo(argv[1]).is_file(), f"{argv[1]} is not a file of jobs/"
        assert "--config" in argv, job
        cfg_path = _in_repo(argv[argv.index("--config") + 1])
        assert cfg_path.is_file(), f"{job}: {cfg_path} does not exist"
        rest = argv[argv.index("--config") + 2 :]
        overrides = [a for a in rest if "=" in a and not a.startswith("-")]
        flags = [a for a in rest if a.startswith("-")]
        for i, flag in enumerate(rest):  # every flag value that is a path is an absolute shared path
            if flag.startswith("--") and i + 1 < len(rest) and "/" in rest[i + 1]:
                assert rest[i + 1].startswith("/mnt/shared/"), f"{job}: {flag} {rest[i + 1]}"
        assert len(overrides) + 2 * len(flags) == len(rest), f"{job}: unexpected arguments {rest}"
        cfg = load_config(str(cfg_path), overrides)
        assert _relative_outputs(to_dict(cfg)) == [], f"{job}: outputs must be absolute shared paths"
        assert str(cfg.run_dir).startswith("/mnt/shared/"), job
        renv = yaml.safe_load(spec["runtimeEnvYAML"])
        RuntimeEnv(**renv)
        for key in renv.get("env_vars", {}):
            assert not re.search(r"KEY|TOKEN|SECRET|PASSWORD", key), f"{job}: {key} must come from a Secret"
        assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode")
        if "clusterSelector" in spec:
            assert spec["clusterSelector"]["ray.io/cluster"] in cluster_names, job
        else:
            assert spec["shutdownAfterJobFinishes"] is True, f"{job}: its own cluster must not outlive it"


def test_synth_api_key_comes_from_a_secret_on_every_pod():
    spec = _rayjobs()["synth"]["spec"]["rayClusterSpec"]
    for _, group in _groups(spec):
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0].get("env", [])}
        assert "secretKeyRef" in env["OPENAI_API_KEY"]["valueFrom"]


def _serve_apps(cfg: dict) -> list[dict]:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(cfg)  # Ray Serve's own schema
    return cfg["applications"]


@pytest.mark.parametrize("name", ["serve_config.local.yaml", "serve_config.gpu.yaml"])
def test_serving_configs_name_real_code_and_recipes(name):
    cfg = yaml.safe_load((REPO / "serving" / name).read_text())
    for app in _serve_apps(cfg):
        module, attr = app["import_path"].split(":")
        assert (REPO / "platform" / (module.replace(".", "/") + ".py")).is_file(), module
        assert f"def {attr}" in (REPO / "platform" / (module.replace(".", "/") + ".py")).read_text()
        assert (REPO / app["args"]["config"]).is_file()


def test_rayservice_matches_serving_gpu_config_and_mounts_the_api_key():
    from rayembed.config import load_config

    (d,) = [d for _, d in _all_k8s_docs() if d["kind"] == "RayService"]
    svc = yaml.safe_load(d["spec"]["serveConfigV2"])
    ref = yaml.safe_load((REPO / "serving" / "serve_config.gpu.yaml").read_text())
    apps, ref_apps = _serve_apps(svc), _serve_apps(ref)
    cfg_path = _in_repo(apps[0]["args"]["config"])
    assert cfg_path.is_file()
    # The same application as serving/serve_config.gpu.yaml, with the recipe path of the image.
    assert cfg_path.relative_to(REPO).as_posix() == ref_apps[0]["args"]["config"]
    apps[0]["args"]["config"] = ref_apps[0]["args"]["config"]
    assert apps == ref_apps
    assert {k: v for k, v in svc.items() if k != "applications"} == {k: v for k, v in ref.items() if k != "applications"}
    key_file = load_config(str(cfg_path)).serve.api_key_file
    assert key_file, "a cluster endpoint bound to 0.0.0.0 must require a key"
    for _, group in _groups(d["spec"]["rayClusterConfig"]):
        pod = group["template"]["spec"]
        mounts = {m["mountPath"]: m for c in pod["containers"] for m in c.get("volumeMounts", [])}
        mount = mounts.get(str(Path(key_file).parent))
        assert mount is not None, f"{group.get('groupName', 'head')}: the API key file is not mounted"
        vol = {v["name"]: v for v in pod["volumes"]}[mount["name"]]
        assert "secret" in vol and Path(key_file).name in {i["path"] for i in vol["secret"]["items"]}


def test_autoscaler_yaml_validates_against_ray_schema_and_keeps_secure_defaults():
    from ray.autoscaler._private.util import validate_config

    cfg = yaml.safe_load((CLUSTER / "autoscaler" / "aws.yaml").read_text())
    validate_config(cfg)
    assert cfg["provider"]["type"] == "aws"
    assert cfg["docker"]["image"].rsplit("/", 1)[-1] == IMAGE_NAME
    gpu_types = [n for n, t in cfg["available_node_types"].items()
                 if re.match(r"(g[456]|p[345])", t["node_config"]["InstanceType"])]
    assert gpu_types and all(cfg["available_node_types"][n]["max_workers"] > 0 for n in gpu_types)
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["worker_start_ray_commands"] if "ray start" in c)
    assert "-e RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert "~/.ray/auth_token" in cfg["file_mounts"]


@pytest.mark.parametrize("name", ["runtime_env.yaml", "runtime_env.pip.yaml"])
def test_runtime_env_recipes_validate_and_keep_uploads_small(name):
    from ray.runtime_env import RuntimeEnv

    from rayembed.cluster.submit import load_runtime_env

    env = load_runtime_env(CLUSTER / name, REPO)
    RuntimeEnv(**env)  # Ray's own validation of every field
    assert env["working_dir"] == str(REPO)
    assert env["py_modules"] == [str(REPO / "platform" / "rayembed")]
    assert {".git/", ".venv/", ".cache/", "runs/"} <= set(env["excludes"])
    assert "RAY_AUTH_MODE" not in env["env_vars"] and "RAY_AUTH_TOKEN" not in env["env_vars"]
    if "pip" in env:
        pin = next(line for line in (REPO / "constraints.txt").read_text().splitlines() if line.startswith("torch=="))
        assert pin in env["pip"]["packages"], "the pip recipe must pin torch as constraints.txt does"


def test_working_dir_upload_stays_far_below_rays_limit(tmp_path):
    """Zip the checkout exactly as `ray job submit --working-dir .` would, with the recipe's excludes."""
    import zipfile

    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, _zip_files

    from rayembed.cluster.submit import load_runtime_env

    env = load_runtime_env(CLUSTER / "runtime_env.yaml", REPO)
    out = tmp_path / "wd.zip"
    _zip_files(str(REPO), env["excludes"], str(out), include_gitignore=True)
    size = out.stat().st_size
    assert size < 32 * 1024 * 1024 < GCS_STORAGE_MAX_SIZE, f"working dir upload would be {size / 2**20:.0f} MiB"
    names = zipfile.ZipFile(out).namelist()
    assert "jobs/train.py" in names and "cluster/runtime_env.yaml" in names
    assert not [n for n in names if n.startswith((".venv/", ".git/", ".cache/", "runs/"))]
