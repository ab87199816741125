"""The gateway's configuration: one typed object, built from the command line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class GatewayConfig:
    model: str        # prepared model folder (tokenizer.json, chat template)
    scheduler: str    # gRPC target of the scheduler
    host: str
    port: int
    log_level: str

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", required=True, help="model folder (for the tokenizer)")
        parser.add_argument("--scheduler", default="127.0.0.1:50060")
        parser.add_argument("--host", default="0.0.0.0")
        parser.add_argument("--port", type=int, default=50051)
        parser.add_argument("--log-level", default="info")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "GatewayConfig":
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})
