"""Total decoding: a decoder returns a value or raises a FormatError, whatever bytes it is given.

Hostile bytes reach every decoder (a manifest from a store, a profile, a batch answer), and the
standard library answers them with many exception types (json's RecursionError on deep nesting,
OverflowError for ``int(float("inf"))``, struct.error on short input, UnicodeDecodeError, ...).
One decorator turns all of them into the decoder's typed error, so no caller can forget one.
"""
from __future__ import annotations

import functools
import struct
from typing import Callable, TypeVar

from lazyfs.errors import FormatError

F = TypeVar("F", bound=Callable)

# What malformed input makes the standard library raise (UnicodeDecodeError is a ValueError).
MALFORMED = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError,
             RecursionError, struct.error)
# What json.loads raises for text that is not JSON it can hold: RecursionError for arrays or
# objects nested past the interpreter's stack ("[" * 100000), ValueError for everything else.
JSON_ERRORS = (ValueError, RecursionError)


def total(what: str, error: type[FormatError] = FormatError) -> Callable[[F], F]:
    """Decorate a decoder of ``what`` so that malformed input raises ``error``, never anything
    else; the decoder's own FormatErrors pass through unchanged."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def decoder(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except FormatError:
                raise
            except MALFORMED as exc:
                raise error(f"malformed {what} ({type(exc).__name__}: {exc})") from None
        return decoder  # type: ignore[return-value]
    return wrap


# JSON values as decoders take them: Python counts true and false as ints, and json.loads gives
# them for any document, so a number field is checked for being a number, not a bool.
def whole(x) -> bool:
    """A whole number, 0 or more."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def number(x) -> bool:
    """An int or a float (not a bool); finite or not is the caller's to say."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)
