"""The one exception type for bad user input, and the one check of a typed value.

Anything a user can get wrong (a mesh spec, a config key, a size that does not divide) raises
`JaxparError` with a one-line message naming the value and what would be valid. The CLI turns it
into that line on stderr and exit code 2; library callers can catch it like any ValueError.
"""

from typing import Any


class JaxparError(ValueError):
    """Bad input: the message names the offending value and what would be valid."""


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               list: "an array", dict: "an object"}  # fmt: skip


def type_error(what: str, value: Any, types: tuple[type, ...]) -> JaxparError:
    """The one-line error for `value` (named `what`) not being one of `types`."""
    names = " or ".join(_TYPE_NAMES[t] for t in types)
    return JaxparError(f"{what} must be {names}, got {value!r}")


def typed(value: Any, types: type | tuple[type, ...], what: str) -> Any:
    """`value` checked against `types`, the one rule for typed values read from YAML, JSON and
    Hugging Face configs: an integer may stand for a number (and comes back a float when only
    float is asked for), a boolean is never a number.

    Raises:
        JaxparError: `value` is of another type; the message names `what`, the value and the
            expected type.
    """
    types = types if isinstance(types, tuple) else (types,)
    is_bool = isinstance(value, bool)
    if is_bool and bool not in types:
        raise type_error(what, value, types)
    if float in types and isinstance(value, int) and not is_bool:
        return value if int in types else float(value)
    if not isinstance(value, types):
        raise type_error(what, value, types)
    return value
