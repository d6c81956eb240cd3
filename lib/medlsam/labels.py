"""The label map: organ names and their label ids, resolved one way everywhere."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from medlsam.errors import ConfigurationError, InputError

MAX_LABEL_ID = 255  # label volumes are uint8


class UnknownOrganError(InputError):
    """An organ name or id that the label map does not know (a bad request parameter: 422, not 404)."""


class LabelMap(Mapping[str, int]):
    """An immutable {organ name: label id} map with unique ids in 1..255.

    `resolve` turns what a user typed (a name, an id, or an id as text) into the organ's name.
    """

    def __init__(self, mapping: Mapping[str, Any], source: str = "label map"):
        if not isinstance(mapping, Mapping) or not mapping:
            raise ConfigurationError(f"{source}: expected a non-empty JSON object {{name: id}}")
        ids: dict[str, int] = {}
        for name, value in mapping.items():
            if str(name).lower() == "background":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_LABEL_ID:
                raise ConfigurationError(f"{source}: id of {name!r} must be an integer in 1..{MAX_LABEL_ID}, "
                                         f"got {value!r}")
            ids[str(name)] = int(value)
        if len(set(ids.values())) != len(ids):
            raise ConfigurationError(f"{source}: label ids must be unique")
        if not ids:
            raise ConfigurationError(f"{source}: no organ besides the background")
        self._ids = dict(sorted(ids.items(), key=lambda kv: kv[1]))
        self._names = {v: k for k, v in self._ids.items()}
        self.source = source

    # --- Mapping --------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> int:
        return self._ids[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"LabelMap({self._ids})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __hash__(self):
        return hash(tuple(self._ids.items()))

    # --- lookups --------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Organ names ordered by label id."""
        return list(self._ids)

    def name_of(self, label_id: int) -> str | None:
        return self._names.get(int(label_id))

    def resolve(self, value: Any) -> str:
        """The organ name for a name, an id or an id written as text; UnknownOrganError otherwise."""
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise InputError(f"an organ is a name or a label id, got {value!r}")
        key = str(value).strip()
        if key in self._ids:
            return key
        if key.isdigit() and int(key) in self._names:
            return self._names[int(key)]
        raise UnknownOrganError(f"unknown organ {value!r}; known organs: {', '.join(self._ids)}")

    def resolve_all(self, values: Iterable[Any] | None) -> list[str] | None:
        """Names for each value (duplicates dropped, order kept); None or empty means all organs."""
        if not values:
            return None
        return list(dict.fromkeys(self.resolve(v) for v in values))

    def subset(self, names: Iterable[str]) -> "LabelMap":
        return LabelMap({n: self._ids[n] for n in names}, source=self.source)

    def to_dict(self) -> dict[str, int]:
        return dict(self._ids)

    # --- files ----------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "LabelMap":
        """Read a JSON label map {organ name: label id}."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigurationError(f"label map not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"label map {path} is not valid JSON: {exc}") from exc
        return cls(raw, source=str(path))
