"""The base every manifest model shares."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Refuses unknown keys (a misspelt key is an error, not a setting ignored for months); frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
