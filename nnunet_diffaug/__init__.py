"""nnunet-diffaug: diffusion-based data augmentation for nnU-Net v2."""
__version__ = "0.1.0"
