"""The sampler shared by every formulation (docs/sampling.md#sampler): time grids, common random noise, Euler with CFG."""

from src.sampling.euler import conversion_coefficients, sample, step_times
from src.sampling.noise import initial_noise
from src.sampling.schedule import rf_time_grid, shift_time

__all__ = ["conversion_coefficients", "initial_noise", "rf_time_grid", "sample", "shift_time", "step_times"]
