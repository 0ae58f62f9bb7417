"""The one exception type that means "bad input": the CLI prints it on one line and exits 2."""


class InnardsError(Exception):
    """A user-facing error: bad input, missing file, incompatible artifact."""


class ChecksumError(InnardsError):
    """A shard or checkpoint whose bytes do not match the recorded checksum."""
