"""The one base of every validated schema: recipes, training configs, toy configs, family tables.

Models are frozen and forbid unknown keys, so a misspelt field is an error that names it; fields
with an alias (``lambda``) accept their Python name too.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_serializer


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    # Fields added after configs were first recorded in outputs' provenance and in stage digests (the
    # cache keys): left out of every dump while they hold their default, so those stay as they were.
    left_out_at_default: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        for name in self.left_out_at_default:
            if getattr(self, name) == type(self).model_fields[name].get_default(call_default_factory=True):
                out.pop(name, None)
        return out
