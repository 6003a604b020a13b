"""Exceptions raised by the library. Only the CLI turns them into exit codes."""

from __future__ import annotations


class DeltaMoEError(Exception):
    """Base class: a problem with the user's input that the message explains how to fix."""


class CheckpointError(DeltaMoEError):
    """A checkpoint directory or file is missing, malformed or inconsistent with its config."""


class ArchitectureError(DeltaMoEError):
    """The model family or one of its config fields cannot be converted."""


class OutputError(DeltaMoEError):
    """The output location exists, is not writable, or could not be finalised."""


class UsageError(DeltaMoEError):
    """An argument value is out of range or inconsistent with another one."""


class DataError(DeltaMoEError):
    """A training or evaluation corpus is missing, empty, or holds records the run cannot use."""
