"""ftserver: the coordinator's command line.

Available now:
    ftserver init DIR --host NAME [--host NAME ...] [--days N] [--force]
        creates a private CA and a server certificate for those host names / IPs (TLS for
        the SuperLink); hand DIR/ca.crt to every site.

Running a coordinator for remote sites (Flower SuperLink + our ServerApp, with TLS and site
authentication) arrives with the deployment work. Until then ``ftserver`` says so and exits
2 rather than pretend; ``ftsim`` runs the same ServerApp with virtual sites today.
"""

from __future__ import annotations

import argparse
import sys

NOT_YET = (
    "ftserver: running a coordinator for remote sites is not available in this version yet "
    "(it comes with the deployment work: SuperLink with TLS, site keys, resume). "
    "Use 'ftsim' to run the same federation with virtual sites on this machine, and "
    "'ftserver init DIR --host NAME' to prepare certificates."
)


def init(argv: list[str]) -> int:
    from .certs import create_certificates

    p = argparse.ArgumentParser(prog="ftserver init", description="Create a CA and a server certificate for the coordinator.")
    p.add_argument("dir")
    p.add_argument("--host", action="append", default=[], required=True, help="a DNS name or IP sites will connect to (repeatable)")
    p.add_argument("--days", type=int, default=365, help="validity (default 365)")
    p.add_argument("--force", action="store_true", help="replace existing files")
    args = p.parse_args(argv)
    try:
        paths = create_certificates(args.dir, args.host, days=args.days, force=args.force)
    except (ValueError, FileExistsError) as e:
        print(f"ftserver init: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(str(x) for x in paths.values())}")
    print(f"certificate valid for: {', '.join(args.host)} ({args.days} days)")
    print(f"give {paths['ca.crt']} to every site; keep ca.key and server.key here (mode 0600)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "init":
        return init(argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    print(NOT_YET, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
