"""Wire models of `POST /v1/responses` requests (OpenAI's Responses API shapes).

Answers are built from the `openai` package's types (`openai.types.responses`); only the
request side is modelled here, with what this service reads. Fields OpenAI defines that are
not served (built-in tools, `background`, ...) are declared so that they can be refused with a
400 naming them, instead of being ignored silently.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseErrorEvent,
    ResponseFailedEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseReasoningTextDeltaEvent,
    ResponseReasoningTextDoneEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)
from pydantic import BaseModel, ConfigDict, Discriminator, Field, RootModel, Tag

from server.inference.protocol import ReasoningEffort


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do for client extensions.
    model_config = ConfigDict(extra="ignore")


class Unserved(_Request):
    """A part, item, tool or tool choice of a type this service does not serve (`input_file`,
    `item_reference`, `web_search`, ...): it reaches the service, which refuses it by name."""

    type: str


def _kind(default: str, union: Any) -> Any:
    """A discriminator reading `type` (`default` when absent) for a union of tagged models:
    a type none of them is tagged with is "other", the `Unserved` member's tag."""
    known = {
        meta.tag
        for member in get_args(union)
        for meta in get_args(member)[1:]
        if isinstance(meta, Tag) and meta.tag != "other"
    }

    def kind(value: Any) -> str:
        # Any JSON may arrive here: a non-string type (or a non-object) is "other", a 400.
        given = (
            value.get("type", default) if isinstance(value, dict) else getattr(value, "type", None)
        )
        return given if isinstance(given, str) and given in known else "other"

    return Discriminator(kind)


# Content parts of input messages.
class InputTextPart(_Request):
    type: Literal["input_text"]
    text: str


class OutputTextPart(_Request):
    """An earlier answer's text, sent back as input."""

    type: Literal["output_text"]
    text: str


class InputImagePart(_Request):
    type: Literal["input_image"]
    image_url: str | None = None  # a data URL (http(s) only with --allow-remote-images)
    file_id: str | None = None  # refused: there is no file store
    detail: str | None = None


class InputAudioIn(_Request):
    data: str  # base64
    format: str = "wav"


class InputAudioPart(_Request):
    type: Literal["input_audio"]
    input_audio: InputAudioIn


_ContentParts = (
    Annotated[InputTextPart, Tag("input_text")]
    | Annotated[OutputTextPart, Tag("output_text")]
    | Annotated[InputImagePart, Tag("input_image")]
    | Annotated[InputAudioPart, Tag("input_audio")]
    | Annotated[Unserved, Tag("other")]
)
ContentPart = Annotated[_ContentParts, _kind("input_text", _ContentParts)]


# Items of `input`.
class MessageIn(_Request):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]


class FunctionCallInput(_Request):
    """An earlier call, as a response's `function_call` output item (sent back as input)."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str
    arguments: str  # JSON text


class FunctionCallOutputIn(_Request):
    """The result of an earlier call."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[ContentPart]


class ReasoningTextIn(_Request):
    type: str = "reasoning_text"
    text: str


class ReasoningIn(_Request):
    """An earlier thought, as a response's `reasoning` output item (sent back as input)."""

    type: Literal["reasoning"]
    summary: list[ReasoningTextIn] = Field(default_factory=list)
    content: list[ReasoningTextIn] | None = None


_InputItems = (
    Annotated[MessageIn, Tag("message")]
    | Annotated[FunctionCallInput, Tag("function_call")]
    | Annotated[FunctionCallOutputIn, Tag("function_call_output")]
    | Annotated[ReasoningIn, Tag("reasoning")]
    | Annotated[Unserved, Tag("other")]
)
InputItem = Annotated[_InputItems, _kind("message", _InputItems)]


# Tools.
class FunctionToolIn(_Request):
    """Responses' flat function tool: `{type, name, description, parameters, strict}`."""

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: Any = None  # checked by the tool planner, which names what is wrong
    strict: bool | None = None


_Tools = Annotated[FunctionToolIn, Tag("function")] | Annotated[Unserved, Tag("other")]
Tool = Annotated[_Tools, _kind("", _Tools)]  # Unserved: a built-in tool (`web_search`, `mcp`, ...)


class FunctionToolChoiceIn(_Request):
    type: Literal["function"]
    name: str


_ToolChoices = Annotated[FunctionToolChoiceIn, Tag("function")] | Annotated[Unserved, Tag("other")]
ToolChoice = Annotated[_ToolChoices, _kind("", _ToolChoices)]  # Unserved: `allowed_tools`, ...


class TextFormatIn(_Request):
    """`text.format`: `text`, `json_object`, or `json_schema` with the schema inline."""

    type: Literal["text", "json_object", "json_schema"]
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfigIn(_Request):
    format: TextFormatIn | None = None
    verbosity: str | None = None  # accepted; the model has no such control


class ReasoningConfigIn(_Request):
    effort: ReasoningEffort | None = None
    summary: str | None = None  # accepted; thoughts come back whole, not summarised


class ResponsesRequest(_Request):
    """`POST /v1/responses`."""

    model: str = Field(min_length=1)
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    text: TextConfigIn | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoice | None = None
    parallel_tool_calls: bool = True
    reasoning: ReasoningConfigIn | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    # vLLM's extensions, as its Responses endpoint takes them.
    seed: int | None = None
    top_k: int | None = Field(None, ge=-1)
    # OpenAI's, not served: refused with a 400 naming them when set.
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    include: list[str] | None = None
    max_tool_calls: int | None = None
    top_logprobs: int | None = None
    truncation: Literal["auto", "disabled"] | None = None


class ResponseDeleted(BaseModel):
    """The answer to `DELETE /v1/responses/{id}` (OpenAI's shape)."""

    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True


# The stream events this service sends, for the OpenAPI document.
ResponseEvent = Annotated[
    ResponseCreatedEvent
    | ResponseInProgressEvent
    | ResponseOutputItemAddedEvent
    | ResponseOutputItemDoneEvent
    | ResponseContentPartAddedEvent
    | ResponseContentPartDoneEvent
    | ResponseTextDeltaEvent
    | ResponseTextDoneEvent
    | ResponseReasoningTextDeltaEvent
    | ResponseReasoningTextDoneEvent
    | ResponseFunctionCallArgumentsDeltaEvent
    | ResponseFunctionCallArgumentsDoneEvent
    | ResponseCompletedEvent
    | ResponseIncompleteEvent
    | ResponseFailedEvent
    | ResponseErrorEvent,
    Field(discriminator="type"),
]


class ResponseStreamEvent(RootModel[ResponseEvent]):
    """One event of a streamed response (`event:` names its `type`)."""
