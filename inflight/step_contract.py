"""Values the step contract (proto/inflight/v1/worker.proto) gives a meaning, named once for both ends."""

# A token id in ScheduledSequence.token_ids: the token this slot sampled in the step before, which
# overlap scheduling plans before it is known. The worker feeds it from the device; it is only ever
# the one token of a single-token chunk.
PREVIOUS_TOKEN = 2**32 - 1
