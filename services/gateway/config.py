"""The gateway's configuration: one typed object, built from the command line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from inflight.tracing import add_otlp_traces_endpoint


@dataclass(frozen=True)
class GatewayConfig:
    model: str        # prepared model folder (tokenizer.json, chat template)
    scheduler: str    # gRPC target of the scheduler
    host: str
    port: int
    metrics_port: int              # Prometheus /metrics over HTTP; 0: off
    auth_tokens_file: str          # `TOKEN TENANT [admin]` lines; empty: no authentication
    auth_exempt: str               # comma-separated method prefixes that need no token
    tls_cert: str                  # PEM certificate chain; with tls_key turns TLS on
    tls_key: str
    tls_client_ca: str             # PEM CA bundle: clients must present a certificate it signed (mTLS)
    max_inflight_per_client: int
    drain_seconds: float           # on SIGTERM: NOT_SERVING, then this long for in-flight streams
    max_inflight_requests: int     # generations in flight at once; past it RESOURCE_EXHAUSTED, answered at once
    max_messages: int              # chat messages in one request
    trust_message_special_tokens: bool  # control tokens typed into messages act as control tokens
    log_level: str
    keepalive_seconds: float = 20.0  # ping interval to the scheduler
    exit_with_parent: bool = False   # started by a launcher: die with it
    kserve: bool = True              # serve inference.GRPCInferenceService (Triton's KServe v2) beside Generation
    trtllm: bool = True              # serve trtllm.TrtllmService (TensorRT-LLM's gRPC, what SMG drives) beside it
    otlp_traces_endpoint: str = ""   # OTLP/gRPC collector for traces (http://host:4317); empty: not traced
    share_port: bool = False         # listen with SO_REUSEPORT: one of several gateway processes on one port

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, include_model: bool = True) -> None:
        if include_model:
            parser.add_argument("--model", required=True, help="model folder (for the tokenizer)")
            parser.add_argument("--scheduler", default="127.0.0.1:50060")
            parser.add_argument("--host", default="0.0.0.0")
            parser.add_argument("--port", type=int, default=50051)
            parser.add_argument("--log-level", default="info")
            parser.add_argument("--keepalive-seconds", type=float, default=20.0)
            parser.add_argument("--exit-with-parent", action="store_true", help="exit when the parent process dies")
            add_otlp_traces_endpoint(parser)
            parser.add_argument("--share-port", action="store_true",
                                help="listen on a port that other gateway processes of this stack share "
                                     "(SO_REUSEPORT; the kernel spreads connections across them). Without it, a port "
                                     "already in use is an error")
        parser.add_argument("--metrics-port", type=int, default=0)
        parser.add_argument("--auth-tokens-file", default="")
        parser.add_argument("--auth-exempt", default="/grpc.health.v1.Health/,/grpc.reflection.")
        parser.add_argument("--tls-cert", default="")
        parser.add_argument("--tls-key", default="")
        parser.add_argument("--tls-client-ca", default="")
        parser.add_argument("--max-inflight-per-client", type=int, default=64)
        parser.add_argument("--drain-seconds", type=float, default=30.0)
        parser.add_argument("--max-inflight-requests", type=int, default=0,
                            help="generations in flight at once across all clients; more get RESOURCE_EXHAUSTED "
                                 "(0: what the scheduler holds, --max-num-seqs + --max-waiting-requests; 1152 for a gateway alone)")
        parser.add_argument("--max-messages", type=int, default=1024, help="chat messages in one request")
        parser.add_argument("--kserve", action=argparse.BooleanOptionalAction, default=True,
                            help="serve Triton's KServe v2 gRPC protocol on the same port (needs tritonclient)")
        parser.add_argument("--trtllm", action=argparse.BooleanOptionalAction, default=True,
                            help="serve TensorRT-LLM's gRPC service on the same port (needs smg-grpc-proto)")
        parser.add_argument("--trust-message-special-tokens", action="store_true",
                            help="encode control tokens typed into messages as control tokens (trusted callers only)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> GatewayConfig:
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})

    def to_flags(self) -> list[str]:
        """The optional flags again, for a launcher that starts the gateway."""
        flags = ["--metrics-port", str(self.metrics_port), "--auth-exempt", self.auth_exempt,
                 "--max-inflight-per-client", str(self.max_inflight_per_client), "--drain-seconds", str(self.drain_seconds),
                 "--max-inflight-requests", str(self.max_inflight_requests), "--max-messages", str(self.max_messages),
                 "--keepalive-seconds", str(self.keepalive_seconds)]
        if self.trust_message_special_tokens:
            flags.append("--trust-message-special-tokens")
        if self.share_port:
            flags.append("--share-port")
        if self.exit_with_parent:
            flags.append("--exit-with-parent")
        if self.otlp_traces_endpoint:
            flags += ["--otlp-traces-endpoint", self.otlp_traces_endpoint]
        if not self.kserve:
            flags.append("--no-kserve")
        if not self.trtllm:
            flags.append("--no-trtllm")
        for name in ("auth_tokens_file", "tls_cert", "tls_key", "tls_client_ca"):
            if getattr(self, name):
                flags += ["--" + name.replace("_", "-"), getattr(self, name)]
        return flags
