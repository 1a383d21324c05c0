"""Consistency of the deployment files with the service (the schema and policy checks run in
`make deploy-check`: kustomize, kubernetes-validate, checkov, hadolint, yamllint)."""

from __future__ import annotations

from pathlib import Path

import yaml

from service.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "k8s" / "base"


def _doc(name: str) -> dict:
    return yaml.safe_load((BASE / name).read_text())


def test_probes_and_drain_timing_match_the_service():
    pod = _doc("deployment.yaml")["spec"]["template"]["spec"]
    settings = _doc("configmap.yaml")["data"]
    [container] = pod["containers"]
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60  # an 8B model load
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + float(settings["VLORA_DRAIN_GRACE_S"]) + 10
    assert container["ports"][0]["containerPort"] == int(settings["VLORA_PORT"])


def test_settings_in_the_configmap_are_real_settings():
    settings = _doc("configmap.yaml")["data"]
    fields = {name.upper() for name in ServiceSettings.model_fields}
    for key in settings:
        if key.startswith("VLORA_"):
            assert key.removeprefix("VLORA_") in fields, key
    ServiceSettings(**{k.removeprefix("VLORA_").lower(): v for k, v in settings.items() if k.startswith("VLORA_")})


def test_pod_is_locked_down():
    pod = _doc("deployment.yaml")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    sc = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] and sc["readOnlyRootFilesystem"]
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["allowPrivilegeEscalation"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert "secret" in volumes["api-keys"] and "data" not in volumes["api-keys"]["secret"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_dockerfile_runs_non_root_with_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    stages = text.split("\nFROM ")
    final = [s for s in stages if s.split()[2:3] in (["cpu"], ["gpu"])]
    assert len(final) == 2
    for stage in final:
        assert "USER 10001" in stage and "HEALTHCHECK" in stage and 'ENTRYPOINT ["tini", "--", "vlora-serve"]' in stage
    assert stages[-1].split()[2] == "gpu"  # the default target


TRAINING_PACKAGES = {"peft", "accelerate", "bitsandbytes", "matplotlib", "sacrebleu", "rouge-score", "liger-kernel",
                     "datasets", "tensorboard", "mlflow-skinny", "wandb"}


def _names(requirements: list[str]) -> set[str]:
    import re

    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_serving_side_installs_no_training_package():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    serving = _names(project["dependencies"] + extras["serve"] + extras["cpu"] + extras["gpu"])
    assert not serving & TRAINING_PACKAGES
    assert TRAINING_PACKAGES <= _names(extras["train"] + extras["train-gpu"] + extras["tracking"])
    stages = {s.split()[2]: s for s in ("\n" + (ROOT / "Dockerfile").read_text()).split("\nFROM ")[1:]}
    for build in ("cpu-build", "gpu-build"):  # what the cpu and gpu serving images copy their venv from
        assert "COPY trainer" not in stages[build] and "train" not in stages[build].split("pip install", 1)[1]
    for image, build in (("cpu", "cpu-build"), ("gpu", "gpu-build")):
        assert f"COPY --from={build} /opt/vlora /opt/vlora" in stages[image]


def test_the_server_imports_nothing_of_the_trainer():
    import subprocess
    import sys

    code = ("import sys, service.main, service.app, service.engine.vllm_engine\n"
            "top = {m.split('.')[0] for m in sys.modules}\n"
            "print(sorted(top & {'trainer', 'peft', 'accelerate', 'bitsandbytes', 'matplotlib', 'sacrebleu', "
            "'rouge_score', 'liger_kernel'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
