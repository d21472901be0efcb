"""The worker's error types: bad input (exit status 2), a node that cannot run the task (3), anything else (1)."""


class InputError(ValueError):
    """Bad input a person can fix: the message is one line that says what is wrong and what is allowed.

    ``field`` names the option or request field at fault when there is one, so an HTTP API can answer
    400 with it.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NodeError(RuntimeError):
    """The machine cannot run the task as its compute backend set it up (a GPU pool's node whose GPU does not
    work): nothing the uploader can fix, and another node may do; the backend retries it and an operator
    looks at the node."""
