"""The one exception type nofc raises for bad input."""


class NofcError(ValueError):
    """Something about the model, the image or the options cannot work.

    The message names what was found and, where possible, what would fit.

    >>> issubclass(NofcError, ValueError)
    True
    """
