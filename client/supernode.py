"""``python -m fedtune.client.supernode ARGS``: Flower's ``flower-supernode`` with shorter waits.

Same arguments and behaviour as ``flower-supernode``; see :mod:`fedtune.common.flwr_latency`
for what is tightened and why. ftclient starts the SuperNode this way.
"""

from __future__ import annotations

import sys

from fedtune.common.flwr_latency import tune_supernode


def main() -> None:
    tune_supernode()
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
