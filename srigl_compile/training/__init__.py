"""Mutable training state: the mask updater, its gradient hooks and its checkpoints."""

from .updater import SRigLUpdater

__all__ = ["SRigLUpdater"]
