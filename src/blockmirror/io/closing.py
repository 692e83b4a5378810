"""``with`` for the objects that own a descriptor: the block closes them, whatever happens."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    """Mixin: ``with obj:`` returns ``obj`` and calls ``obj.close()`` at the end of the block.

    The subclass defines ``close()``; it must be safe to call twice (an explicit close inside
    the block, then the one on the way out).
    """

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
