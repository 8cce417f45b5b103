"""A response's output items, built as the model writes, with the stream events that say so.

`OutputAssembler` is fed what the chat layer reads from a completion (thoughts, text, whole
tool calls) and answers with the Responses stream events for it, in the order the official
client's `responses.stream` helper consumes: an item is added, its content streams, it is done.
The non-streamed answer is assembled by the same code, so the two agree.
"""

from __future__ import annotations

import uuid
from typing import Any

from openai.types.responses import (
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseFunctionToolCall,
    ResponseOutputItem,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseReasoningItem,
    ResponseReasoningTextDeltaEvent,
    ResponseReasoningTextDoneEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)
from openai.types.responses.response_content_part_added_event import PartReasoningText
from openai.types.responses.response_content_part_done_event import (
    PartReasoningText as DonePartReasoningText,
)
from openai.types.responses.response_reasoning_item import Content as ReasoningContent
from pydantic import BaseModel

from server.inference.chat_tools import ReadDelta, ToolCallOut


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _OpenItem:
    """The message or thought being written."""

    def __init__(self, kind: str, index: int) -> None:
        self.kind = kind  # "message" or "reasoning"
        self.id = item_id("msg" if kind == "message" else "rs")
        self.index = index
        self.text = ""


class OutputAssembler:
    """Output items and their events, for one response."""

    def __init__(self) -> None:
        self.items: list[ResponseOutputItem] = []
        self.reasoning = ""
        self.text = ""
        self.calls: list[ToolCallOut] = []
        self._open: _OpenItem | None = None
        self._sequence = 0

    def event(self, kind: type[BaseModel], **fields: Any) -> BaseModel:
        """An event of type `kind`, numbered in sending order."""
        event = kind(sequence_number=self._sequence, **fields)
        self._sequence += 1
        return event

    def add(self, read: ReadDelta) -> list[BaseModel]:
        """Events for the next stretch of output: thoughts, text, then whole calls."""
        events: list[BaseModel] = []
        if read.reasoning:
            events += self._write("reasoning", read.reasoning)
            self.reasoning += read.reasoning
        if read.content:
            events += self._write("message", read.content)
            self.text += read.content
        for call in read.tool_calls:
            events += self._call(call)
        return events

    def finish(self, incomplete: bool) -> list[BaseModel]:
        """Close the item being written (`incomplete` when output was cut off)."""
        return self._close("incomplete" if incomplete else "completed")

    def _write(self, kind: str, text: str) -> list[BaseModel]:
        events: list[BaseModel] = []
        if self._open is not None and self._open.kind != kind:
            events += self._close("completed")
        if self._open is None:
            events += self._start(kind)
        item = self._open
        assert item is not None
        item.text += text
        if kind == "message":
            delta: BaseModel = self.event(
                ResponseTextDeltaEvent,
                type="response.output_text.delta",
                logprobs=[],
                **self._where(item),
                delta=text,
            )
        else:
            delta = self.event(
                ResponseReasoningTextDeltaEvent,
                type="response.reasoning_text.delta",
                **self._where(item),
                delta=text,
            )
        events.append(delta)
        return events

    @staticmethod
    def _where(item: _OpenItem) -> dict[str, Any]:
        return {"item_id": item.id, "output_index": item.index, "content_index": 0}

    def _start(self, kind: str) -> list[BaseModel]:
        item = _OpenItem(kind, len(self.items))
        self._open = item
        added: ResponseOutputItem
        part: ResponseOutputText | PartReasoningText
        if kind == "message":
            added = ResponseOutputMessage(
                id=item.id, type="message", role="assistant", status="in_progress", content=[]
            )
            part = ResponseOutputText(type="output_text", text="", annotations=[])
        else:
            added = ResponseReasoningItem(
                id=item.id, type="reasoning", summary=[], content=[], status="in_progress"
            )
            part = PartReasoningText(type="reasoning_text", text="")
        self.items.append(added)
        return [
            self._item_added(item.index, added),
            self.event(
                ResponseContentPartAddedEvent,
                type="response.content_part.added",
                **self._where(item),
                part=part,
            ),
        ]

    def _close(self, status: str) -> list[BaseModel]:
        item, self._open = self._open, None
        if item is None:
            return []
        done: ResponseOutputItem
        part: ResponseOutputText | DonePartReasoningText
        if item.kind == "message":
            part = ResponseOutputText(type="output_text", text=item.text, annotations=[])
            done = ResponseOutputMessage(
                id=item.id, type="message", role="assistant", status=status, content=[part]
            )
            text_done = self.event(
                ResponseTextDoneEvent,
                type="response.output_text.done",
                **self._where(item),
                text=item.text,
                logprobs=[],
            )
        else:
            part = DonePartReasoningText(type="reasoning_text", text=item.text)
            done = ResponseReasoningItem(
                id=item.id,
                type="reasoning",
                summary=[],
                content=[ReasoningContent(type="reasoning_text", text=item.text)],
                status=status,
            )
            text_done = self.event(
                ResponseReasoningTextDoneEvent,
                type="response.reasoning_text.done",
                **self._where(item),
                text=item.text,
            )
        self.items[item.index] = done
        return [
            text_done,
            self.event(
                ResponseContentPartDoneEvent,
                type="response.content_part.done",
                **self._where(item),
                part=part,
            ),
            self._item_done(item.index, done),
        ]

    def _call(self, call: ToolCallOut) -> list[BaseModel]:
        events = self._close("completed")
        index = len(self.items)
        fields = {"type": "function_call", "id": item_id("fc"), "call_id": call.id}
        added = ResponseFunctionToolCall(
            **fields, name=call.name, arguments="", status="in_progress"
        )
        done = ResponseFunctionToolCall(
            **fields, name=call.name, arguments=call.arguments, status="completed"
        )
        self.items.append(done)
        self.calls.append(call)
        where = {"item_id": done.id, "output_index": index}
        return [
            *events,
            self._item_added(index, added),
            # Calls are released whole (see CompletionReader): their arguments in one delta.
            self.event(
                ResponseFunctionCallArgumentsDeltaEvent,
                type="response.function_call_arguments.delta",
                delta=call.arguments,
                **where,
            ),
            self.event(
                ResponseFunctionCallArgumentsDoneEvent,
                type="response.function_call_arguments.done",
                arguments=call.arguments,
                **where,
            ),
            self._item_done(index, done),
        ]

    def _item_added(self, index: int, item: ResponseOutputItem) -> BaseModel:
        return self.event(
            ResponseOutputItemAddedEvent,
            type="response.output_item.added",
            output_index=index,
            item=item,
        )

    def _item_done(self, index: int, item: ResponseOutputItem) -> BaseModel:
        return self.event(
            ResponseOutputItemDoneEvent,
            type="response.output_item.done",
            output_index=index,
            item=item,
        )
