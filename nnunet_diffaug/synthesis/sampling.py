"""From a label map to an image: few-step samplers, latent diffusion, bounded-memory decoding.

Samplers (all use the exact beta schedule the model was trained with):

- ``dpmpp`` DPM-Solver++ (2nd order), ``unipc`` UniPC, ``ddim`` DDIM (eta 0, trailing timesteps):
  diffusers schedulers, which work on 4D and 5D tensors alike; good images in 10-25 steps.
- ``ddpm``: MONAI's ancestral DDPM over all training timesteps (its step assumes consecutive
  timesteps, so ``steps`` is ignored); the slow reference.
- ``rflow``: Euler steps along MONAI's ``RFlowScheduler`` timestep grid, for models trained with the
  rectified-flow objective (Liu et al., "Flow Straight and Fast", ICLR 2023); 10-30 steps. The other
  samplers need a DDPM-trained model and are refused for a rectified-flow one (and vice versa).

Bounded memory: latents larger than a window (the training patch's latent) are denoised window by
window at every step, the model outputs blended with gaussian weights (:func:`model_output`), as the
decoder already is (:func:`decode_latents`).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from nnunet_diffaug.errors import DiffAugError
from nnunet_diffaug.synthesis.config import DDPM_SAMPLERS, SAMPLERS
from nnunet_diffaug.synthesis.conditioning import Condition
from nnunet_diffaug.synthesis.image_generator import is_rflow


class Sampler:
    """A reverse-diffusion schedule. Call :meth:`begin` before each sample: diffusers schedulers keep history."""

    def __init__(self, name: str, train_scheduler, steps: int):
        if name not in SAMPLERS:
            raise DiffAugError(f"Unknown sampler {name!r}; choose one of {SAMPLERS}.")
        if int(steps) != steps or steps < 1:
            raise DiffAugError(f"--steps {steps}: a sampler needs at least 1 step.")
        if is_rflow(train_scheduler) and name != "rflow":
            raise DiffAugError(f"Sampler {name!r} is for models trained with diffusion.objective 'ddpm'; this "
                               f"synthesizer was trained with rectified flow ('rflow'): use --sampler rflow.")
        if name == "rflow" and not is_rflow(train_scheduler):
            raise DiffAugError(f"Sampler 'rflow' needs a model trained with diffusion.objective 'rflow'; this "
                               f"synthesizer was trained with 'ddpm': use one of {DDPM_SAMPLERS}.")
        self.name = name
        self._train_scheduler = train_scheduler
        T = int(train_scheduler.num_train_timesteps)
        self.steps = T if name == "ddpm" else min(int(steps), T)
        self.begin()
        if name == "rflow":  # continuous time; the model was trained on float timesteps
            self.timesteps = [float(t) for t in self._s.timesteps]
        else:
            self.timesteps = [int(t) for t in self._s.timesteps]
        self.timestep_dtype = torch.float32 if name == "rflow" else torch.long

    def begin(self) -> None:
        """A fresh scheduler state for a new sample."""
        ts, T = self._train_scheduler, int(self._train_scheduler.num_train_timesteps)
        if self.name == "rflow":  # stateless; the copy only carries the timestep grid
            import copy
            self._s = copy.deepcopy(ts)
            self._s.set_timesteps(self.steps)
            return
        if self.name == "ddpm":
            import copy
            self._s = copy.deepcopy(ts)
            self._s.set_timesteps(T)
            return
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
        betas = ts.betas.detach().cpu().numpy().astype(np.float64)
        common = dict(num_train_timesteps=T, trained_betas=betas, prediction_type=ts.prediction_type)
        if self.name == "dpmpp":
            self._s = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **common)
        elif self.name == "unipc":
            self._s = UniPCMultistepScheduler(**common)
        else:  # trailing spacing starts at t = T-1, which few-step DDIM needs
            self._s = DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing", **common)
        self._s.set_timesteps(self.steps)

    def step(self, model_output: torch.Tensor, t: int, sample: torch.Tensor,
             generator: torch.Generator | None) -> torch.Tensor:
        if self.name == "rflow":
            # Euler step to the next grid point (0 after the last). MONAI's step() truncates the next timestep to
            # an int, which breaks continuous grids such as 30 steps, so the one-line update is done here.
            i = self.timesteps.index(t)
            t_next = self.timesteps[i + 1] if i + 1 < len(self.timesteps) else 0.0
            return sample + model_output * ((t - t_next) / self._train_scheduler.num_train_timesteps)
        if self.name == "ddpm":
            return self._s.step(model_output, t, sample, generator=generator)[0]
        if self.name == "ddim":
            return self._s.step(model_output, t, sample, eta=0.0).prev_sample
        return self._s.step(model_output, t, sample).prev_sample


def _mkldnn_conv_forward(self, x: torch.Tensor) -> torch.Tensor:
    if (not self.training and not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and self.weight.dtype == torch.float32):
        return torch.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride, self.dilation,
                                        self.groups)
    return type(self).forward(self, x)


def enable_fast_cpu_convolutions(module: nn.Module) -> nn.Module:
    """Routes inference convolutions on the CPU through oneDNN.

    Why: for batch 1 and small volumes torch's heuristic picks its native ``slow_conv3d`` kernel,
    about 7x slower than oneDNN for the same fp32 result (differences ~1e-6). Training (grad
    enabled) and other devices keep the stock path.
    """
    if not torch.backends.mkldnn.is_available():
        return module
    for m in module.modules():
        if (type(m) in (nn.Conv2d, nn.Conv3d) and m.padding_mode == "zeros" and not isinstance(m.padding, str)
                and not getattr(m, "_diffaug_fast_cpu", False)):
            m.forward = _mkldnn_conv_forward.__get__(m)
            m._diffaug_fast_cpu = True
    return module


def _randn(shape, generator: torch.Generator, device) -> torch.Tensor:
    # noise is drawn on the CPU so a seed gives the same start on every device
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


def model_output(model: nn.Module, z: torch.Tensor, t, condition: Condition, dtype: torch.dtype,
                 window: list[int] | None = None, overlap: float = 0.25) -> torch.Tensor:
    """The model's prediction for latents ``z`` at timestep ``t``, in fp32.

    ``window`` (latent voxels): when ``z`` is larger, the model runs on overlapping windows of ``z`` and
    of the full-resolution condition (same region, ``factor`` times larger), and the predictions are
    blended with gaussian weights, so memory is that of one window whatever the volume size.
    """
    if window is None or all(s <= w for s, w in zip(z.shape[2:], window)):
        return model(z, torch.full((z.shape[0],), t, device=z.device, dtype=dtype), condition).float()
    from monai.inferers import sliding_window_inference
    factor = condition.spatial.shape[2] // z.shape[2]

    def predictor(win: torch.Tensor, coords) -> torch.Tensor:
        b, _, *spatial = coords[0]  # sw_batch_size 1: one window of one batch element
        cond = Condition(condition.spatial[(b, slice(None), *[slice(s.start * factor, s.stop * factor)
                                                               for s in spatial])],
                         None if condition.spacing is None else condition.spacing[b])
        return model(win, torch.full((win.shape[0],), t, device=win.device, dtype=dtype), cond).float()

    roi = [min(s, w) for s, w in zip(z.shape[2:], window)]
    return sliding_window_inference(z, roi_size=roi, sw_batch_size=1, predictor=predictor, overlap=overlap,
                                    mode="gaussian", with_coord=True).float()


@torch.no_grad()
def sample_latents(model: nn.Module, condition: Condition, latent_shape: tuple[int, ...], sampler: Sampler,
                   generator: torch.Generator, progress: bool = False, window: list[int] | None = None,
                   overlap: float = 0.25) -> torch.Tensor:
    """Reverse diffusion in latent space, conditioned on a full-resolution label map (and its extras).
    ``window``: see :func:`model_output` (None: the whole latent at once)."""
    device = condition.spatial.device
    sampler.begin()
    z = _randn(latent_shape, generator, device)
    steps = sampler.timesteps
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc=f"{sampler.name} sampling", leave=False)
    for t in steps:  # schedulers step in fp32 even under autocast
        out = model_output(model, z, t, condition, sampler.timestep_dtype, window, overlap)
        z = sampler.step(out, t, z, generator if sampler.name == "ddpm" else None)
    return z


@torch.no_grad()
def decode_latents(autoencoder: nn.Module, z: torch.Tensor, window: list[int], overlap: float) -> torch.Tensor:
    """Decodes latents; larger than ``window`` (latent voxels), by gaussian-blended sliding windows.

    Bounded memory: only one window's activations live at a time, whatever the volume size.
    """
    spatial = list(z.shape[2:])
    if all(s <= w for s, w in zip(spatial, window)):
        return autoencoder.decode_stage_2_outputs(z).float()
    from monai.inferers import sliding_window_inference
    roi = [min(s, w) for s, w in zip(spatial, window)]
    return sliding_window_inference(z, roi_size=roi, sw_batch_size=1, predictor=autoencoder.decode_stage_2_outputs,
                                    overlap=overlap, mode="gaussian").float()


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when enabled; a no-op elsewhere (CPU results stay fp32 and exact)."""
    import contextlib
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def padded_shape(shape: tuple[int, ...], divisor: int) -> list[int]:
    return [int(-(-s // divisor) * divisor) for s in shape]


@torch.no_grad()
def generate_images(autoencoder: nn.Module, model: nn.Module, scale_factor: float, condition: Condition,
                    latent_channels: int, latent_factor: int, decode_window: list[int], sampler: Sampler,
                    generator: torch.Generator, decode_overlap: float = 0.25, progress: bool = False,
                    diffusion_window: list[int] | None = None, diffusion_overlap: float = 0.25) -> torch.Tensor:
    """Images (B, C, *spatial) for a condition whose spatial size fits the divisor."""
    spatial = condition.spatial
    latent_shape = (spatial.shape[0], latent_channels, *[s // latent_factor for s in spatial.shape[2:]])
    z = sample_latents(model, condition, latent_shape, sampler, generator, progress, diffusion_window,
                       diffusion_overlap)
    return decode_latents(autoencoder, z / scale_factor, decode_window, decode_overlap)


def _noised(scheduler, known: torch.Tensor, t: int, generator: torch.Generator) -> torch.Tensor:
    """``known`` latents diffused to timestep ``t`` with the training schedule (t < 0: clean)."""
    if t < 0:
        return known
    tt = torch.full((known.shape[0],), t, dtype=torch.long, device=known.device)
    return scheduler.add_noise(known, _randn(known.shape, generator, known.device), tt)


@torch.no_grad()
def sample_latents_inpaint(model: nn.Module, condition: Condition, known: torch.Tensor, repaint: torch.Tensor,
                           sampler: Sampler, generator: torch.Generator, resample_jumps: int = 0,
                           progress: bool = False, window: list[int] | None = None,
                           overlap: float = 0.25) -> torch.Tensor:
    """RePaint in latent space (Lugmayr et al., CVPR 2022): only latents where ``repaint`` is 1 are sampled.

    ``known`` (B, c, *latent): the real case's (scaled) latents. After every step the kept region is
    replaced by ``known`` diffused to the step's timestep, so the sample is pulled towards agreeing with
    the real context. ``resample_jumps`` > 0: each step is redone that many times from its own output
    re-noised by one step (jump length 1), which harmonises the repainted region with its context.
    Works with every sampler: the kept region is noised with the training scheduler, whose betas every
    sampler shares; multistep solvers are rewound to their state before the step for each redo.
    ``window``: see :func:`model_output` (a large repainted region samples within one window's memory).
    """
    import copy
    if sampler.name == "rflow":
        raise DiffAugError("Inpainting (RePaint) re-noises the kept region with a DDPM noise schedule; this "
                           "synthesizer was trained with rectified flow (diffusion.objective 'rflow'), which has "
                           "none. Use a synthesizer trained with diffusion.objective 'ddpm'.")
    device = condition.spatial.device
    scheduler = sampler._train_scheduler
    alphas = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    repaint = repaint.to(device=device, dtype=torch.float32)
    sampler.begin()
    ts = sampler.timesteps
    z = _randn(known.shape, generator, device)
    z = repaint * z + (1 - repaint) * _noised(scheduler, known, ts[0], generator)
    steps = range(len(ts))
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc=f"{sampler.name} inpainting", leave=False)
    for i in steps:
        t, t_prev = ts[i], (ts[i + 1] if i + 1 < len(ts) else -1)
        jumps = resample_jumps if t_prev >= 0 else 0  # the last step lands on clean latents: nothing to redo
        for j in range(jumps + 1):
            state = copy.deepcopy(sampler._s) if j < jumps else None
            out = model_output(model, z, t, condition, sampler.timestep_dtype, window, overlap)
            z_prev = sampler.step(out, t, z, generator if sampler.name == "ddpm" else None)
            z_prev = repaint * z_prev + (1 - repaint) * _noised(scheduler, known, t_prev, generator)
            if state is None:
                break
            sampler._s = state  # redo this step from z_prev diffused back to t: q(x_t | x_t_prev)
            ratio = alphas[t] / alphas[t_prev]
            z = ratio.sqrt() * z_prev + (1 - ratio).sqrt() * _randn(z.shape, generator, device)
        z = z_prev
    return z
