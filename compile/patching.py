"""The one way this extension changes an attribute of someone else's object for a while: set it, and afterwards put
back exactly what was there.

Other code patches the same objects (webui's attention optimizations and Lora replace class-level ``forward``s,
extensions install instance ``forward``s): restoring means setting the object's own previous attribute again, or
deleting ours when it had none, so that lookups fall through to the class as before. Never popping or overwriting what
we did not put there.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

_ABSENT = object()


@contextlib.contextmanager
def patched(patches: Iterable[tuple[Any, str, Any]]) -> Iterator[None]:
    """``(owner, name, value)`` each set for the duration; the owner's own attribute (``vars(owner)``, not one it
    inherits) is restored afterwards, in reverse order, also when the body raises."""
    previous = []
    try:
        for owner, name, value in patches:
            previous.append((owner, name, vars(owner).get(name, _ABSENT)))
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in reversed(previous):
            if value is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
