"""`inflight generate`: stream a completion from a running gateway to the terminal.

    inflight generate "Once upon a time" --max-tokens 64
    inflight generate --chat "What is the capital of France?"
    inflight generate --interactive            # a multi-turn chat on stdin
    inflight generate --json --logprobs "Hi"   # one JSON object per response
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from inflight.v1 import generation_pb2
from services.client import InflightClient


def build_request(args: argparse.Namespace, messages: list[tuple[str, str]] | None = None) -> generation_pb2.GenerateRequest:
    request = generation_pb2.GenerateRequest(max_tokens=args.max_tokens, top_k=args.top_k, stop=args.stop,
                                             logprobs=args.logprobs, ignore_eos=args.ignore_eos)
    if messages is not None:
        for role, content in messages:
            request.messages.add(role=role, content=content)
    elif args.chat:
        if args.system:
            request.messages.add(role="system", content=args.system)
        request.messages.add(role="user", content=args.prompt)
    else:
        request.prompt = args.prompt
    for name in ("temperature", "top_p", "seed", "min_p"):
        if getattr(args, name) is not None:
            setattr(request, name, getattr(args, name))
    return request


def stream_to_terminal(client: InflightClient, request: generation_pb2.GenerateRequest, args: argparse.Namespace) -> str:
    text = ""
    for response in client.stream(request, timeout=args.timeout):
        text += response.text
        if args.json:
            print(json.dumps(MessageToDict(response, preserving_proto_field_name=True)), flush=True)
        else:
            print(response.text, end="", flush=True)
    if not args.json:
        print()
    return text


def interactive(client: InflightClient, args: argparse.Namespace) -> None:
    messages: list[tuple[str, str]] = [("system", args.system)] if args.system else []
    print("chat: type a message, an empty line or Ctrl-D ends", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        messages.append(("user", line.rstrip("\n")))
        reply = stream_to_terminal(client, build_request(args, messages), args)
        messages.append(("assistant", reply))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="inflight generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="")
    parser.add_argument("--address", default="localhost:50051")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    parser.add_argument("--interactive", action="store_true", help="multi-turn chat, one message per line of stdin")
    parser.add_argument("--system", default="", help="a system message for --chat and --interactive")
    parser.add_argument("--max-tokens", type=int, default=0)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[])
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--logprobs", action="store_true")
    parser.add_argument("--json", action="store_true", help="print each response as a JSON line")
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--token", default=None, help="bearer token")
    parser.add_argument("--tenant", default=None, help="x-tenant-id")
    parser.add_argument("--tls-ca", default=None, help="PEM CA bundle: connect with TLS")
    parser.add_argument("--tls-cert", default=None, help="client certificate (mTLS)")
    parser.add_argument("--tls-key", default=None, help="client key (mTLS)")
    args = parser.parse_args(argv)
    if not args.prompt and not args.interactive:
        parser.error("give a prompt, or --interactive")
    read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
    client = InflightClient(args.address, token=args.token, tenant=args.tenant, tls_root_certificates=read(args.tls_ca),
                            tls_private_key=read(args.tls_key), tls_certificate_chain=read(args.tls_cert))
    with client:
        try:
            if args.interactive:
                interactive(client, args)
            else:
                stream_to_terminal(client, build_request(args), args)
        except grpc.RpcError as error:
            print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
    return 0
