"""The errors `dualwrite` raises. Catch `DualWriteError` to catch them all."""

from __future__ import annotations

SEND_FAILED_TEXT = "Message failed to send. Retry?"
NOT_SAVED_WARNING = "Message sent but not saved. It will disappear in 1 hour."


class DualWriteError(Exception):
    """Base class of every error raised on purpose by `dualwrite`."""


class SendFailed(DualWriteError):
    """The realtime write failed: the message was not sent and nothing else was written.

    The message is always exactly the banner text of the specification; the backend error
    that caused it is chained as ``__cause__``.
    """

    def __init__(self) -> None:
        super().__init__(SEND_FAILED_TEXT)


class InvalidInput(DualWriteError, ValueError):
    """Input was refused before anything was written. ``field`` names the offending field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class TextTooLong(InvalidInput):
    """The message text is longer than the configured limit."""


class ClientMessageIdReused(InvalidInput):
    """A `clientMessageId` was sent again with another channel or text."""


class BadSetting(DualWriteError, ValueError):
    """A configuration value could not be used; the message names the variable or flag."""


class BackendError(DualWriteError):
    """A backend call failed; the original error is chained as ``__cause__``."""


class BackendUnavailable(BackendError):
    """A backend cannot be reached: down, cut off, refusing connections, or not answering.

    Its message is one line naming the backend and what happens meanwhile.
    """


class BackendTimeout(BackendUnavailable, TimeoutError):
    """A backend call did not answer within its configured timeout."""


class UnknownBackend(DualWriteError, ValueError):
    """A backend URL names a scheme no backend serves, or is malformed."""


class NotQueued(DualWriteError, LookupError):
    """A manual retry named a message id that is not waiting in the retry queue."""


class MessageNotFound(DualWriteError, LookupError):
    """No tier holds the message any more (never sent, or expired from the realtime tier)."""


class CursorExpired(DualWriteError, LookupError):
    """A live cursor is older than the realtime tier keeps: what followed it may be gone.

    The client reloads history, then watches again without a cursor.
    """
