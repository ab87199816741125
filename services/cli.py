"""The `inflight` command: serve the stack, run one process of it, or generate from a running one."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {
        "serve": "the whole stack: worker group (mpiexec), scheduler and gateway",
        "gateway": "the public gRPC gateway alone",
        "scheduler": "the scheduler alone",
        "worker": "one worker rank (start under mpiexec -n TP)",
        "generate": "stream a completion from a running gateway",
    }
    if not argv or argv[0] not in commands:
        usage = "\n".join(f"  {name:<10} {text}" for name, text in commands.items())
        print(f"usage: inflight COMMAND [options]\n\ncommands:\n{usage}", file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from services.launcher import ServeConfig, serve

        parser = argparse.ArgumentParser(prog="inflight serve", description=commands["serve"])
        ServeConfig.add_arguments(parser)
        raise SystemExit(serve(ServeConfig.from_args(parser.parse_args(rest))))
    if command == "gateway":
        from services.gateway.__main__ import main as gateway_main

        gateway_main(rest)
    elif command == "scheduler":
        from scheduler.__main__ import main as scheduler_main

        scheduler_main(rest)
    elif command == "worker":
        from worker.__main__ import main as worker_main

        worker_main(rest)
    elif command == "generate":
        from services.client_cli import main as generate_main

        raise SystemExit(generate_main(rest))


if __name__ == "__main__":
    main()
