"""The run directory: where each artifact lives, manifests and fingerprints, the lock,
typed records and their reader, resumable JSONL files, shards."""
