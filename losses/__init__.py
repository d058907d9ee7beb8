"""Losses as pure functions of tensors with keyword options."""
from losses.propos import byol_alignment_loss, prototype_scattering_loss

__all__ = ["byol_alignment_loss", "prototype_scattering_loss"]
