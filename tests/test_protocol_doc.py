"""docs/protocol.md against the code: every payload model's fields (with required/optional) and every
error code are documented, and nothing documented is gone from the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from fishim import messages
from fishim.messages import ErrorCode

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
MODELS: list[type[BaseModel]] = [messages.Envelope, messages.Status, messages.Item, messages.Chat, messages.MediaRef,
                                 messages.Location, messages.Pick, messages.Receipt, messages.SyncRequest,
                                 messages.SyncPage, messages.SyncEvent, messages.ErrorMessage]
ROW = re.compile(r"^\| `([a-z_0-9]+)` \|(.*)$")


def table_after(marker: str) -> dict[str, list[str]]:
    """First-column name -> the other cells, for the table right after ``<!-- marker -->``."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    start = lines.index(f"<!-- {marker} -->")
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            break
        match = ROW.match(line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split("|")]
    assert rows, f"no table after <!-- {marker} -->"
    return rows


def own_fields(model: type[BaseModel]) -> dict[str, bool]:
    """name -> required, without the envelope's fields on the channel models."""
    inherited = set(messages.Envelope.model_fields) if model is not messages.Envelope and issubclass(
        model, messages.Envelope) else set()
    return {name: field.is_required() for name, field in model.model_fields.items() if name not in inherited}


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_field_is_documented_with_required_or_optional(model: type[BaseModel]) -> None:
    rows = table_after(f"model: {model.__name__}")
    fields = own_fields(model)
    assert set(rows) == set(fields), f"docs/protocol.md and {model.__name__} disagree"
    for name, required in fields.items():
        assert rows[name][1] == ("required" if required else "optional"), f"{model.__name__}.{name}"


def test_every_error_code_is_documented_with_meaning_and_fix() -> None:
    rows = table_after("error codes")
    assert set(rows) == {code.value for code in ErrorCode}
    assert all(len(cells) >= 2 and cells[0] and cells[1] for cells in rows.values())


def test_the_doc_stands_alone() -> None:
    text = DOC.read_text(encoding="utf-8")
    root = DOC.parent.parent
    for ref in re.findall(r"`((?:docs|examples|fishim|tests)/[\w./-]+\.(?:md|py))`", text):
        assert (root / ref).exists(), f"docs/protocol.md points at {ref}, which is not in the repository"
    assert re.findall(r"[\w/.-]+\.md", text) and all((root / r).exists() or (root / "docs" / r).exists()
                                                    for r in re.findall(r"(?<![\w/])docs/[\w-]+\.md", text))
    for state in messages.OrderState:
        assert f"`{state.value}`" in text and state.value in text.split("```mermaid")[1].split("```")[0]
