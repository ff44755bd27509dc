"""The teacher server: hosts multi-task PyTorch models and serves their soft targets over gRPC and
HTTP from one asyncio process (see docs/architecture in ../shared/guides and docs/protocol.md)."""
