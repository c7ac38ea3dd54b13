"""The only module in the folder that nnUNet_extTrainer points at (see `diffaug_trainer_path`).

nnU-Net imports every module in that folder while looking for a trainer by name. The classes
themselves live in the installed package, so data-augmentation worker processes can import them.
"""
from nnunet_diffaug.trainers.nnUNetTrainerDiffAug import *  # noqa: F401,F403  (the names in its __all__)
