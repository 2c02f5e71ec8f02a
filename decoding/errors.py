"""Errors raised while a family is configured and loaded (before the engine exists)."""


class FamilyError(Exception):
    """The family cannot be loaded: bad config, missing file or package, vocabularies that differ.

    The message is one line naming the model entry; `eft-serve` prints it and exits 2.
    """
