"""`inflight generate`: stream a completion from a running gateway to the terminal."""

from __future__ import annotations

import argparse
import json
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from inflight.v1 import generation_pb2
from services.client import InflightClient


def build_request(args: argparse.Namespace) -> generation_pb2.GenerateRequest:
    request = generation_pb2.GenerateRequest(max_tokens=args.max_tokens, top_k=args.top_k, stop=args.stop)
    if args.chat:
        request.messages.add(role="user", content=args.prompt)
    else:
        request.prompt = args.prompt
    if args.temperature is not None:
        request.temperature = args.temperature
    if args.top_p is not None:
        request.top_p = args.top_p
    if args.seed is not None:
        request.seed = args.seed
    return request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="inflight generate", description=__doc__)
    parser.add_argument("prompt")
    parser.add_argument("--address", default="localhost:50051")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    parser.add_argument("--max-tokens", type=int, default=0)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[])
    parser.add_argument("--json", action="store_true", help="print each response as a JSON line")
    parser.add_argument("--timeout", type=float, default=None)
    args = parser.parse_args(argv)
    with InflightClient(args.address) as client:
        try:
            for response in client.stream(build_request(args), timeout=args.timeout):
                if args.json:
                    print(json.dumps(MessageToDict(response)), flush=True)
                else:
                    print(response.text, end="", flush=True)
        except grpc.RpcError as error:
            print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
    if not args.json:
        print()
    return 0
