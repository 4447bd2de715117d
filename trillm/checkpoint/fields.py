"""Typed reading of the values a checkpoint describes itself with (config.json, GGUF metadata): every value
a model depends on is checked once, where it is read, and a bad one is an error naming the file, the key,
what it must be and what it is.
"""

import math
from pathlib import Path

import numpy as np

from trillm.errors import CheckpointError

REQUIRED = object()  # the default of a key that must be present


class Fields:
    """The values of one JSON object or GGUF metadata table; `source` is the file they come from."""

    def __init__(self, values, source: Path | str, prefix: str = ""):
        if not isinstance(values, dict):
            raise CheckpointError(f"{source}: {prefix.rstrip('.') or 'the file'} must be a JSON object, "
                                  f"got {type(values).__name__}")
        self.values, self.source, self.prefix = values, source, prefix

    def __contains__(self, key: str) -> bool:
        return self.values.get(key) is not None

    def fail(self, key: str, rule: str, value) -> CheckpointError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return CheckpointError(f"{self.source}: {self.prefix}{key} must be {rule}, got {shown}")

    def get(self, key: str, default=REQUIRED):
        """The raw value; null counts as absent (as transformers reads its configs)."""
        value = self.values.get(key)
        if value is not None:
            return value
        if default is REQUIRED:
            raise CheckpointError(f"{self.source}: {self.prefix}{key} is missing")
        return default

    def integer(self, key: str, default=REQUIRED, minimum: int = 1) -> int:
        value = self.get(key, default)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise self.fail(key, f"an integer >= {minimum}", value)
        return int(value)

    def number(self, key: str, default=REQUIRED, minimum: float = 0.0, inclusive: bool = False) -> float:
        value = self.get(key, default)
        if (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating))
                or not math.isfinite(value) or value < minimum or (value == minimum and not inclusive)):
            raise self.fail(key, f"a finite number {'>=' if inclusive else '>'} {minimum:g}", value)
        return float(value)

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.get(key, default)
        if not isinstance(value, (bool, np.bool_)):
            raise self.fail(key, "true or false", value)
        return bool(value)

    def text(self, key: str, default=REQUIRED, choices: tuple[str, ...] | None = None) -> str:
        value = self.get(key, default)
        if not isinstance(value, str):
            raise self.fail(key, "a string", value)
        if choices is not None and value not in choices:
            raise self.fail(key, f"one of {', '.join(map(repr, choices))}", value)
        return value

    def table(self, key: str) -> "Fields":
        """A nested object (quantization_config, rope_parameters), empty when absent."""
        return Fields(self.get(key, {}), self.source, f"{self.prefix}{key}.")

    def token_ids(self, key: str) -> list[int]:
        """A token id or a list of them (generation_config.json's eos_token_id) as a list; [] when absent."""
        value = self.get(key, [])
        ids = value if isinstance(value, list) else [value]
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_)) and i >= 0 for i in ids):
            raise self.fail(key, "a token id or a list of them", value)
        return [int(i) for i in ids]
