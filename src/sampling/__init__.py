"""Sampling (docs/sampling.md#sampler): time grids, common random noise, and the samplers (Euler on the shared RF-time grid, Euler/DDIM
in each family's own time, Heun), all with classifier-free guidance over one denoiser seam."""

from src.sampling.denoiser import Denoiser, conversion_coefficients
from src.sampling.euler import euler
from src.sampling.grids import GRIDS, karras_times, native_times, step_times, trailing_times, uniform_times
from src.sampling.heun import heun
from src.sampling.noise import initial_noise
from src.sampling.registry import SAMPLERS, Sampler, get_sampler, sample, sampler_nfe, sampler_times
from src.sampling.schedule import rf_time_grid, shift_time

__all__ = [
    "GRIDS", "SAMPLERS", "Denoiser", "Sampler", "conversion_coefficients", "euler", "get_sampler", "heun",
    "initial_noise", "karras_times", "native_times", "rf_time_grid", "sample", "sampler_nfe", "sampler_times",
    "shift_time", "step_times", "trailing_times", "uniform_times",
]
