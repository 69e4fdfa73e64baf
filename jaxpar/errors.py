"""The one exception type for bad user input.

Anything a user can get wrong (a mesh spec, a config key, a size that does not divide) raises
`JaxparError` with a one-line message naming the value and what would be valid. The CLI turns it
into that line on stderr and exit code 2; library callers can catch it like any ValueError.
"""


class JaxparError(ValueError):
    """Bad input: the message names the offending value and what would be valid."""
