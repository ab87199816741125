"""Text on the gateway's side: tokenizer, chat template, streaming detokenization, stop strings."""
