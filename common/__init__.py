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
