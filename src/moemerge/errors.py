"""One error type for everything a user can get wrong.

The CLI prints a :class:`MoemergeError` as a single line (``error: ...``) and exits with status 2; anything else is a
bug and keeps its traceback.
"""


class MoemergeError(Exception):
    """A problem with the user's input (model, data, recipe) that we can explain in one line."""
