"""Server-sent events in OpenAI's streaming format."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from server.http.errors import ServiceError, envelope, unexpected_error_body

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


async def with_error_event(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """After a 200 the status cannot change: a failure becomes an error event, then [DONE]."""
    try:
        async for event in events:
            yield event
    except ServiceError as exc:
        yield f"data: {json.dumps(envelope(exc))}\n\n"
        yield DONE
    except Exception:
        logger.exception("stream failed")
        yield f"data: {json.dumps(unexpected_error_body())}\n\n"
        yield DONE
