"""Synthesis quality metrics that need no downloaded weights (``diffaug_evaluate``).

A trained nnU-Net model of the real dataset is the judge: it segments the synthetic images (label
fidelity) and its encoder provides the features for a Fréchet distance (realism). Diversity
(pairwise MS-SSIM), label statistics and memorisation (nearest training case) need no model.
The background (voxels the label map leaves unlabelled) is also judged on its own: the model's false
positives there and the Fréchet distance of mostly-background tiles (``background``).

The fold's validation cases are the held-out real reference (seen by neither the model nor the
synthesizer); the training cases give the real-vs-real reference and are the only cases that can
have been memorised. Works on any synthetic raw dataset: it never imports the synthesis package.
"""
from nnunet_diffaug.evaluation.inputs import EvaluationInputs, resolve_inputs
from nnunet_diffaug.evaluation.run import Settings, default_output_folder, evaluate

__all__ = ["EvaluationInputs", "Settings", "default_output_folder", "evaluate", "resolve_inputs"]
