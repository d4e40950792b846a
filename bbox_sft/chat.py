"""The chat turns of a record, in TRL's vision prompt/completion format: the one shape every task writes."""

from __future__ import annotations

from typing import Any


def prompt_messages(instruction: str) -> list[dict[str, Any]]:
    """The user turn: one image placeholder, then the instruction (TRL's vision prompt format)."""
    return [
        {
            "role": "user",
            "content": [{"type": "image", "text": None}, {"type": "text", "text": instruction}],
        }
    ]


def completion_messages(answer: str) -> list[dict[str, Any]]:
    """The assistant turn holding the answer text."""
    return [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def instruction_of(prompt: list[dict[str, Any]]) -> str:
    """The instruction a record's prompt asks (its user turn's text)."""
    return next(part["text"] for part in prompt[0]["content"] if part["type"] == "text")


def answer_of(completion: list[dict[str, Any]]) -> str:
    """The answer text of a record's completion."""
    return completion[0]["content"][0]["text"]
