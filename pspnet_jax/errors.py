"""The error a user can fix: commands print its message as one line and exit with status 2.

Raised where the cause is known to be the user's input (a config value, a
file, a dataset not yet prepared) and the message says what to do. It is a
ValueError, so callers that catch ValueError keep working; any other exception
is a bug and keeps its traceback.
"""


class UserError(ValueError):
  """A mistake in the user's input, with the fix in its message."""


class AlreadyExists(UserError, FileExistsError):
  """A file or folder the command would replace is there (and no --overwrite was given)."""


class MissingFile(UserError, FileNotFoundError):
  """A file, folder or prepared dataset the user named is not there (also a
  FileNotFoundError, for callers that catch that)."""
