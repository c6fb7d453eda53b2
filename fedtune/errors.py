"""One exception root for everything fedtune raises on purpose.

A user sees ``str(error)`` as a one-line message and a non-zero exit (see
``fedtune.cli``); a traceback means a bug in fedtune, not in the user's input.
"""

from __future__ import annotations


class FedTuneError(Exception):
    """Root of every error fedtune raises deliberately."""

    exit_code = 2  # what `fedtune` exits with when this ends a command


class ConfigError(FedTuneError):
    """A configuration value is missing, unknown or out of range."""


class DataError(FedTuneError):
    """A site's data file is unreadable or a record is malformed."""


class ModelError(FedTuneError):
    """A base model cannot be found or loaded."""


class ModelMismatchError(FedTuneError):
    """An adapter or update was made for a different base model or adapter spec."""


class UpdateRejected(FedTuneError):
    """A client's update failed validation and is kept out of the merge."""


class CheckpointError(FedTuneError):
    """A checkpoint or run folder is missing, corrupt or from another run."""


class PrivacyError(FedTuneError):
    """A privacy ledger is unreadable or unsafe, or a privacy target cannot be met."""


class FederationStopped(FedTuneError):
    """The federation cannot go on (privacy budgets are spent); it ends after its last completed round."""


class StoppedEarly(FedTuneError):
    """A run ended before its last round but trained some: the last trained round's adapter
    is exported, the command says why it stopped and exits 3 (2: nothing usable)."""

    exit_code = 3


class KeyFileError(FedTuneError):
    """A key file is missing, damaged, or readable by others."""


class InvalidEnvelope(FedTuneError):
    """An envelope failed to parse, verify or decrypt. Deliberately says no more than that."""

    def __init__(self) -> None:
        super().__init__("invalid envelope")


class EnvelopeVersionError(InvalidEnvelope):
    """An envelope of a format version this fedtune does not read (the version byte is public)."""

    def __init__(self, got: int, want: int) -> None:
        FedTuneError.__init__(
            self,
            f"envelope format version {got} is not accepted (this coordinator reads version {want} only); "
            "the sender runs another fedtune version: upgrade the hospital and the coordinator to the same release",
        )
        self.got, self.want = got, want
