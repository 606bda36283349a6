"""`python -m privacy_ops.stack_servers stripe --port P`: entry points for stand-ins that lack a loopback option.

localstripe's own `start()` listens on every interface and pickles its whole store to /tmp/localstripe.pickle on
each write (shared by every instance on the machine, and full of test customers). Here it listens on 127.0.0.1 only
and keeps its data in memory; `DELETE /_config/data` empties it. Started by `privacy_ops.stack`, not by hand.
"""

from __future__ import annotations

import argparse
import logging


def run_stripe(port: int) -> None:
    """Serve localstripe on 127.0.0.1:port with the disk dump disabled, until SIGTERM/SIGINT."""
    from aiohttp import web
    from localstripe import resources, server

    # Every store write calls dump_to_disk(); a no-op keeps the data in memory and out of /tmp.
    resources.Store.dump_to_disk = lambda self: None
    access_log = logging.getLogger("aiohttp.access")
    access_log.setLevel(logging.INFO)
    access_log.addHandler(logging.StreamHandler())
    web.run_app(server.app, host="127.0.0.1", port=port, access_log=access_log, print=None)


def main(argv: list[str] | None = None) -> None:
    """Parse `SERVICE --port P` and run that server in the foreground."""
    parser = argparse.ArgumentParser(prog="python -m privacy_ops.stack_servers", description=__doc__)
    parser.add_argument("service", choices=["stripe"])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    run_stripe(args.port)


if __name__ == "__main__":
    main()
