"""The one exception type for user mistakes.

Anything the user can fix (a bad config key, a missing folder, a corrupt image, an adapter that does not
fit the model) is raised as `UserError` with one readable paragraph that names the culprit and what is
allowed. The CLI turns it into exit status 2 and no traceback; everything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """A mistake the user can fix; the message is shown as-is, without a traceback."""

    exit_code = 2


class RunInterrupted(UserError):
    """The run stopped on a signal (SIGTERM, Ctrl-C); the message says where it resumes. Exit 128 + signal number."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number
