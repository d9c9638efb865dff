"""Text deltas of one streamed choice."""

from __future__ import annotations

from specdec.sampling_params import SamplingParams

from .tool_formats import ToolCall
from .tools import ToolPlan


class TextStreamer:
    """A stream's text deltas: the engine's incremental text (complete UTF-8 characters only,
    specdec/detokenizer.py), less any end that may be the start of a stop string (held back
    until it is known not to be one). Nothing here decodes: the cost per delta does not grow
    with the output."""

    def __init__(self, params: SamplingParams) -> None:
        self.stops = params.stop
        self.held = ""
        self.sent_chars = 0

    def push(self, new_text: str) -> str:
        text = self.held + new_text
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):  # might be the start of a stop string
                    hold = max(hold, k)
                    break
        out, self.held = text[: len(text) - hold], text[len(text) - hold:]
        self.sent_chars += len(out)
        return out

    def finish(self, final_text: str) -> str:
        """The rest of the request's final text (stop string cut off, held bytes flushed)."""
        delta = final_text[self.sent_chars:]
        self.sent_chars = len(final_text)
        return delta


class ChoiceStream:
    """A chat choice's content deltas: TextStreamer's, less any text from where a tool call may
    start (held until the answer ends: then it is parsed into calls, or sent as content if it
    is not one)."""

    def __init__(self, params: SamplingParams, plan: ToolPlan) -> None:
        self.text = TextStreamer(params)
        self.plan = plan
        self.released = ""  # text TextStreamer let through
        self.sent = 0  # characters of it sent as content

    def push(self, new_text: str) -> str:
        self.released += self.text.push(new_text)
        hold = self.plan.hold_from(self.released)
        end = len(self.released) if hold is None else max(hold, self.sent)
        delta, self.sent = self.released[self.sent:end], end
        return delta

    def finish(self, final_text: str) -> tuple[str, list[ToolCall]]:
        """The rest of the content and the answer's tool calls."""
        content, calls = self.plan.parse(final_text)
        content = content or ""
        sent = self.released[: self.sent]
        delta = content[len(sent):] if content.startswith(sent) else ""
        return delta, calls
