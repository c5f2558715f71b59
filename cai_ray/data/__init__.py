"""Prompts and rows: conversations, prompt sources, exactly-once stage shards, tokenisation, the embedded samples."""
