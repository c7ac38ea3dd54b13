"""The nnU-Net side of nnunet-diffaug: trainers that mix synthetic cases into training.

Nothing here imports the generative models: synthetic data arrive as an nnU-Net raw dataset.
"""
from importlib.metadata import PackageNotFoundError, version as _version

_MIN_NNUNET = (2, 8)


def _check_nnunet_version() -> None:
    try:
        found = _version("nnunetv2")
    except PackageNotFoundError:
        raise ImportError("nnunet-diffaug needs nnunetv2>=2.8,<2.9, which is not installed: "
                          "pip install 'nnunetv2>=2.8,<2.9'") from None
    parts = tuple(int(p) for p in found.split(".")[:2] if p.isdigit())
    if parts < _MIN_NNUNET:
        raise ImportError(f"nnunet-diffaug needs nnunetv2>=2.8 (found {found}): its trainer API and "
                          f"nnUNet_extTrainer lookup changed in 2.8. pip install -U 'nnunetv2>=2.8,<2.9'")


_check_nnunet_version()
