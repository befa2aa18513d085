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


def quiet_dependency_warnings() -> None:
    """Hide a dependency's deprecation notice that is not for our users: importing bitsandbytes
    (peft does, whenever it is installed) imports torch.utils.mkldnn, which uses
    torch.jit.script_method. Python hides DeprecationWarnings by default, but Flower's
    simulation engine turns them all on ("once") when imported, so ftsim calls this again
    after importing it."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning)


quiet_dependency_warnings()
