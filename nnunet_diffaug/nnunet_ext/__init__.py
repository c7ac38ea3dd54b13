"""Holds only the trainer shim; nnUNet_extTrainer points here."""
