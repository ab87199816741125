"""Shared pieces of the inflight processes: logging, model store, generated protos (inflight.v1)."""
