"""Exception types raised at the package boundary (files, images, prompts, checkpoints).

Catch `PaliGemmaError` to handle every error this package raises on purpose; the subclasses say
whose fault it is: the caller's input or the checkpoint on disk.
"""


class PaliGemmaError(Exception):
    """Base class for errors raised on purpose by this package."""


class InputError(PaliGemmaError, ValueError):
    """A user input is unusable: a missing or undecodable image, a prompt/image count mismatch, ..."""


class CheckpointError(PaliGemmaError):
    """A checkpoint directory or file is missing, corrupt or inconsistent (config, weights, tokenizer)."""
