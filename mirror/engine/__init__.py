"""The engine: plan (pure) what blobs images need, then copy them concurrently, each digest once."""
