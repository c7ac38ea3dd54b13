"""A trained nnU-Net model used as an offline judge: nnU-Net's own preprocessing, predictor and encoder.

One class, three jobs that share the loaded network: preprocess a raw case exactly as nnU-Net does for
inference, segment it (nnU-Net's sliding window and export), and read its encoder's features.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nnunet_diffaug.errors import DiffAugError


@dataclass
class PreprocessedCase:
    case_id: str
    data: np.ndarray          # (channels, *spatial) in nnU-Net's preprocessed space (target spacing, normalised)
    properties: dict          # nnU-Net's properties, needed to export a prediction back to raw geometry
    label_file: str
    seg: np.ndarray           # (1, *spatial) the case's label map on the same grid as ``data``


class TrainedModel:
    def __init__(self, model_folder: Path, fold: int, checkpoint: str = "checkpoint_final.pth",
                 device: str = "cpu", use_mirroring: bool = True):
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        from nnunet_diffaug.trainer_discovery import ensure_trainer_discoverable
        ensure_trainer_discoverable()  # the model's trainer class may be one of ours (also when called as a library)
        self.device = torch.device(device)
        self.predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
                                         perform_everything_on_device=self.device.type == "cuda",
                                         device=self.device, verbose=False, verbose_preprocessing=False,
                                         allow_tqdm=False)
        try:
            self.predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=(fold,),
                                                                checkpoint_name=checkpoint)
        except RuntimeError as e:
            raise DiffAugError(f"nnU-Net could not load {model_folder}/fold_{fold}/{checkpoint}: {e}") from None
        self.use_mirroring = use_mirroring
        cm = self.predictor.configuration_manager
        self.patch_size = tuple(int(p) for p in cm.patch_size)
        self.preprocessor = cm.preprocessor_class(verbose=False)
        self.foreground_labels = list(self.predictor.label_manager.foreground_labels)
        self.reader_writer = self.predictor.plans_manager.image_reader_writer_class()

    def class_names(self) -> dict[str, str]:
        """Label value -> dataset.json name of every foreground class (region-based labels keep their values)."""
        return {str(v): name for name, v in self.predictor.dataset_json["labels"].items()
                if isinstance(v, int) and v in self.foreground_labels}

    @property
    def spatial_dims(self) -> int:
        return len(self.patch_size)

    def ct_clip_range(self) -> tuple[float, float] | None:
        """The raw (low, high) nnU-Net's CT normalisation clips the first channel to (None for other schemes)."""
        p = self.predictor
        if p.configuration_manager.normalization_schemes[0] != "CTNormalization":
            return None
        props = p.plans_manager.foreground_intensity_properties_per_channel
        props = props.get("0", props.get(0))
        return float(props["percentile_00_5"]), float(props["percentile_99_5"])

    def preprocess(self, case_id: str, case: dict) -> PreprocessedCase:
        p = self.predictor
        data, seg, props = self.preprocessor.run_case(case["images"], case["label"], p.plans_manager,
                                                      p.configuration_manager, p.dataset_json)
        props.pop("class_locations", None)  # sampled for training only; can be large
        # -1 marks background outside nnU-Net's nonzero crop mask
        return PreprocessedCase(case_id, np.asarray(data, dtype=np.float32), props, case["label"],
                                np.maximum(np.asarray(seg), 0))

    def segment(self, case: PreprocessedCase, output_file_truncated: Path) -> Path:
        """nnU-Net's prediction of one preprocessed case, exported in raw geometry; returns the file."""
        from nnunetv2.inference.export_prediction import export_prediction_from_logits
        p = self.predictor
        Path(output_file_truncated).parent.mkdir(parents=True, exist_ok=True)
        logits = p.predict_logits_from_preprocessed_data(torch.from_numpy(case.data)).cpu()
        final = Path(str(output_file_truncated) + p.dataset_json["file_ending"])
        # exported under a hidden name, then renamed: a killed run never leaves a half-written prediction
        staging = final.parent / f".partial_{final.name[:-len(p.dataset_json['file_ending'])]}"
        export_prediction_from_logits(logits, case.properties, p.configuration_manager, p.plans_manager,
                                      p.dataset_json, str(staging), False)
        os.replace(str(staging) + p.dataset_json["file_ending"], final)
        return final

    # ------------------------------------------------------------------------------------------
    # encoder features
    # ------------------------------------------------------------------------------------------

    def _feature_layers(self):
        """The last convolution of every encoder stage.

        Why the convolution and not the stage output: nnU-Net normalises every block with instance
        norm, which removes each case's per-channel mean and variance, exactly what global average
        pooling would read. The convolution just before it still carries them.
        """
        net = getattr(self.predictor.network, "_orig_mod", self.predictor.network)
        stages = getattr(getattr(net, "encoder", None), "stages", None)
        if stages is None:
            raise DiffAugError(f"{type(net).__name__} has no encoder.stages: realism features need one of "
                               f"nnU-Net's U-Net architectures (PlainConvUNet, ResidualEncoderUNet).")
        convs = [[m for m in stage.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)] for stage in stages]
        return net, [c[-1] for c in convs if c]

    def tiles(self, data: np.ndarray, max_tiles: int, pad_value: float = 0) -> list[np.ndarray]:
        """Patch-sized tiles at nnU-Net's sliding-window positions (2d: per slice), at most ``max_tiles``.

        The positions depend only on the array's shape, so a case's label map (``seg``, same grid as ``data``)
        gives the label tile of every image tile at the same index (``tile_background_shares``)."""
        from acvl_utils.cropping_and_padding.padding import pad_nd_image
        from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
        patch = self.patch_size
        if len(patch) == 2:  # nnU-Net 2d: the network sees axial slices
            slices = [data[:, z] for z in range(data.shape[1])]
        else:
            slices = [data]
        tiles = []
        for img in slices:
            # cases smaller than the patch along an axis (common with nnU-Net's default plans) are
            # zero-padded up to it, as nnU-Net's sliding window does; np.pad takes `constant_values`
            img = pad_nd_image(img, patch, "constant", {"constant_values": pad_value}, False)
            steps = compute_steps_for_sliding_window(img.shape[1:], patch, 0.5)
            for start in np.stack(np.meshgrid(*steps, indexing="ij"), -1).reshape(-1, len(patch)):
                sl = tuple(slice(int(s), int(s) + p) for s, p in zip(start, patch))
                tiles.append(img[(slice(None),) + sl])
        if len(tiles) > max_tiles:  # spread evenly so every part of the case is represented
            keep = np.unique(np.round(np.linspace(0, len(tiles) - 1, max_tiles)).astype(int))
            tiles = [tiles[i] for i in keep]
        return tiles

    def tile_background_shares(self, seg: np.ndarray, max_tiles: int) -> np.ndarray:
        """(tiles,) the share of background (label 0) among the case's own voxels in each tile that
        ``encoder_features(data, max_tiles)`` makes of the same case; zero padding beyond the case counts as
        neither (it is marked -1 here, a value no label map holds)."""
        shares = []
        for tile in self.tiles(np.asarray(seg, dtype=np.int32), max_tiles, pad_value=-1):
            inside = int((tile >= 0).sum())
            shares.append((tile == 0).sum() / inside if inside else 1.0)
        return np.asarray(shares, dtype=np.float64)

    @torch.inference_mode()
    def encoder_features(self, data: np.ndarray, max_tiles: int = 16, batch_size: int = 8) -> np.ndarray:
        """(tiles, features): each encoder stage's last convolution, global-average-pooled, concatenated."""
        net, layers = self._feature_layers()
        net.to(self.device).eval()
        pooled: list[torch.Tensor] = []
        hooks = [s.register_forward_hook(lambda _m, _i, out: pooled.append(
            out.flatten(2).mean(-1).float().cpu())) for s in layers]
        rows = []
        try:
            tiles = self.tiles(data, max_tiles)
            for i in range(0, len(tiles), batch_size):
                pooled.clear()
                x = torch.from_numpy(np.stack(tiles[i:i + batch_size])).to(self.device)
                net.encoder(x)
                rows.append(torch.cat(pooled, dim=1).numpy())
        finally:
            for h in hooks:
                h.remove()
        return np.concatenate(rows).astype(np.float64)
