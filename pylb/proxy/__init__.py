"""pylb's live driver: the asyncio HTTP proxy in front of vLLM replicas (`pylb serve`)."""
