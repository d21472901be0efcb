"""The worker's error types: bad input (exit status 2) versus everything else (exit status 1)."""


class InputError(ValueError):
    """Bad input a person can fix: the message is one line that says what is wrong and what is allowed.

    ``field`` names the option or request field at fault when there is one, so an HTTP API can answer
    400 with it.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
