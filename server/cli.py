"""ftserver: the coordinator's command line.

Running a coordinator for remote sites (Flower SuperLink + our ServerApp, with TLS and site
authentication) arrives with the deployment work. Until then ftserver says so and exits 2
rather than pretend; ``ftsim`` runs the same ServerApp with virtual sites today.
"""

from __future__ import annotations

import sys

NOT_YET = (
    "ftserver: running a coordinator for remote sites is not available in this version yet "
    "(it comes with the deployment work: SuperLink with TLS, site keys, resume). "
    "Use 'ftsim' to run the same federation with virtual sites on this machine."
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    print(NOT_YET, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
