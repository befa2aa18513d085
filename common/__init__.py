"""fedtune.common."""

import logging as _logging


class _NoKernelsHubFetch(_logging.Filter):
    """bitsandbytes (imported by peft whenever it is installed) logs a warning on every import on
    an AVX512-BF16 CPU unless the optional ``kernels`` package is there, which would fetch a CPU
    kernel from the Hugging Face hub at run time: something fedtune never does. The plain CPU path
    works, so the warning is noise in every site's log."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsHubFetch())


def _no_hub_kernels() -> None:
    """transformers >= 5.25 installs the ``kernels`` package and uses hub kernels by default, and
    with the package there bitsandbytes (imported by peft) asks the Hugging Face hub for a CPU
    kernel when it is imported on an AVX512-BF16 CPU (``get_kernel("kernels-community/
    quantization-bitsandbytes")``): downloads of code at run time that nobody named, which
    fedtune never does. Two switches, each the owner's own: ``USE_HUB_KERNELS=NO`` is
    transformers' (``from_pretrained`` then kernelizes nothing; set here, so Ray workers and
    child processes inherit it), and marking the module absent (the import system's
    ``sys.modules[name] = None``) makes bitsandbytes' import of it fail, so it falls back to its
    plain CPU path as it does without the package."""
    import os
    import sys

    os.environ.setdefault("USE_HUB_KERNELS", "NO")
    sys.modules.setdefault("kernels", None)


_no_hub_kernels()


def quiet_dependency_warnings() -> None:
    """Hide a dependency's deprecation notice that is not for our users: importing bitsandbytes
    (peft does, whenever it is installed) imports torch.utils.mkldnn, which uses
    torch.jit.script_method. Python hides DeprecationWarnings by default, but Flower's
    simulation engine turns them all on ("once") when imported, so ftsim calls this again
    after importing it."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning)


quiet_dependency_warnings()
