"""The response cache: keys, stored entries, the stores, and single flight (one upstream
answer fanned out to every client that asked for it)."""
