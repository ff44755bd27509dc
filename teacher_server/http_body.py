"""Reading HTTP request bodies under the size limit, for both HTTP APIs (ours and v2)."""

from __future__ import annotations

from fastapi import Request

from protocol.errors import MessageTooLarge


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it passes `limit` bytes (never buffered past it)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise MessageTooLarge(f"body: {declared} bytes is above the limit of {limit}", "body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise MessageTooLarge(f"body: more than the limit of {limit} bytes", "body")
        chunks.append(chunk)
    return b"".join(chunks)
