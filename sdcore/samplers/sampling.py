"""The samplers, as k-diffusion's sampling.py has them: each a plain function that runs the whole loop, with
any multistep history a local variable, so no step can run out of order or leak into another call.

One signature: sample_x(model, x, schedule, noise, callback), plus eta for the samplers that take one.
    model(x_in, t) -> eps    x_in is the sampler's model input; t is a 0-dim long tensor of schedule.timesteps
    noise(like) -> fresh N(0, 1) draws shaped and typed like `like`, each image's from its own generator
    callback(i, x)           after model call i (0-based, one per timestep) with the x that step produced
Each equals its diffusers scheduler built from SD 1.5's config and steps in x's dtype where that scheduler
does (fp16 latents step in fp16), in fp32 where it upcasts.
"""

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from . import quadpack
from .schedules import ALPHAS_CUMPROD, TRAIN_STEPS, Schedule, alpha_sigma

Model = Callable[[Tensor, Tensor], Tensor]
Noise = Callable[[Tensor], Tensor]
Callback = Callable[[int, Tensor], None]

ONE = torch.tensor(1.0)


def sample_ddpm(model: Model, x: Tensor, schedule: Schedule, noise: Noise, callback: Callback) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020) on a subsequence of the 1000 training steps, as diffusers'
    DDPMScheduler runs it: fixed_small variance, epsilon prediction, no clipping."""
    timesteps = schedule.timesteps
    for i, t in enumerate(timesteps):
        eps = model(x, t)
        alpha_prod = ALPHAS_CUMPROD[t]
        alpha_prod_prev = ALPHAS_CUMPROD[timesteps[i + 1]] if i + 1 < len(timesteps) else ONE
        # One step spans 1000 // steps training steps: its beta is the product over them, not betas[t].
        alpha = alpha_prod / alpha_prod_prev
        beta = 1 - alpha

        x0 = (x - (1 - alpha_prod) ** 0.5 * eps) / alpha_prod**0.5
        # Posterior mean of q(x_prev | x_t, x0), eq. 7 of the paper.
        x0_coeff = (alpha_prod_prev**0.5 * beta) / (1 - alpha_prod)
        x_coeff = alpha**0.5 * (1 - alpha_prod_prev) / (1 - alpha_prod)
        mean = x0_coeff * x0 + x_coeff * x

        # The offset keeps every t >= 1, so noise is drawn at every step, the last one included.
        variance = torch.clamp((1 - alpha_prod_prev) / (1 - alpha_prod) * beta, min=1e-20)
        x = mean + variance**0.5 * noise(eps)
        callback(i, x)
    return x


def sample_ddim(model: Model, x: Tensor, schedule: Schedule, noise: Noise, callback: Callback,
                eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2020), deterministic at eta = 0, as diffusers' DDIMScheduler runs it with SD 1.5's
    config (set_alpha_to_one False, no clipping)."""
    stride = TRAIN_STEPS // schedule.steps
    for i, t in enumerate(schedule.timesteps):
        eps = model(x, t)
        alpha_prod = ALPHAS_CUMPROD[t]
        # set_alpha_to_one=False: the last step lands on alpha_cumprod[0], not on a clean 1.
        alpha_prod_prev = ALPHAS_CUMPROD[max(int(t) - stride, 0)]

        x0 = (x - (1 - alpha_prod) ** 0.5 * eps) / alpha_prod**0.5
        variance = ((1 - alpha_prod_prev) / (1 - alpha_prod)) * (1 - alpha_prod / alpha_prod_prev)
        std = eta * variance**0.5
        direction = (1 - alpha_prod_prev - std**2) ** 0.5 * eps
        x = alpha_prod_prev**0.5 * x0 + direction
        if eta > 0:
            x = x + std * noise(eps)
        callback(i, x)
    return x


def sample_euler(model: Model, x: Tensor, schedule: Schedule, noise: Noise, callback: Callback) -> Tensor:
    """Euler's method on the probability-flow ODE in sigma space (Karras et al. 2022, k-diffusion's
    sample_euler without churn) as diffusers' EulerDiscreteScheduler runs it. Draws no noise."""
    sigmas = schedule.sigmas
    for i, t in enumerate(schedule.timesteps):
        sigma = sigmas[i]
        eps = model(x / ((sigma**2 + 1) ** 0.5), t)
        x = x.to(torch.float32)
        x0 = x - sigma * eps
        derivative = (x - x0) / sigma
        x = (x + derivative * (sigmas[i + 1] - sigma)).to(eps.dtype)
        callback(i, x)
    return x


def sample_heun(model: Model, x: Tensor, schedule: Schedule, noise: Noise, callback: Callback) -> Tensor:
    """Heun's method (Karras et al. 2022, algorithm 1 without churn) as diffusers' HeunDiscreteScheduler runs
    it: an Euler step to the next sigma, then a second model call there and the step redone with the mean of
    the two slopes; the last step, down to sigma 0, stays Euler. schedule.timesteps has a timestep per model
    call (heun_schedule): even calls start a step, odd calls correct it, so the callback also sees the Euler
    guess. Steps in x's dtype, as the reference does."""
    sigmas = schedule.sigmas
    for i, t in enumerate(schedule.timesteps):
        sigma = sigmas[i]
        eps = model(x / ((sigma**2 + 1) ** 0.5), t)
        x0 = x - sigma * eps
        if i % 2 == 0:
            x_start, slope_start = x, (x - x0) / sigma
            dt = sigmas[i + 1] - sigma
            x = x + slope_start * dt
        else:
            slope = (slope_start + (x - x0) / sigma) / 2
            x = x_start + slope * dt
        callback(i, x)
    return x


def sample_euler_ancestral(model: Model, x: Tensor, schedule: Schedule, noise: Noise,
                           callback: Callback) -> Tensor:
    """Euler ancestral (k-diffusion's sample_euler_ancestral) as diffusers' EulerAncestralDiscreteScheduler
    runs it: steps in sigma space, x = x0 + sigma * noise, with noise re-injected after each deterministic
    step."""
    sigmas = schedule.sigmas
    for i, t in enumerate(schedule.timesteps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        eps = model(x / ((sigma**2 + 1) ** 0.5), t)
        x = x.to(torch.float32)
        x0 = x - sigma * eps
        # Split the way down to sigma_next into a deterministic part (sigma_down) and fresh noise (sigma_up).
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        derivative = (x - x0) / sigma
        x = x + derivative * (sigma_down - sigma)
        # Drawn at the last step too (where sigma_up is 0), to consume the generator as the reference does.
        x = (x + noise(eps) * sigma_up).to(eps.dtype)
        callback(i, x)
    return x


def sample_dpmpp_2m(model: Model, x: Tensor, schedule: Schedule, noise: Noise, callback: Callback) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) as diffusers' DPMSolverMultistepScheduler runs it with SD 1.5's
    config: data prediction, midpoint solver, first order on the first and the last step (final sigma zero).
    Draws no noise."""
    sigmas = schedule.sigmas
    last = len(schedule.timesteps) - 1
    x0_prev = None  # the multistep history: the previous step's x0 prediction
    for i, t in enumerate(schedule.timesteps):
        eps = model(x, t)
        alpha_s, sigma_s = alpha_sigma(sigmas[i])
        x0 = (x - sigma_s * eps) / alpha_s

        alpha_t, sigma_t = alpha_sigma(sigmas[i + 1])
        h = log_snr(sigmas[i + 1]) - log_snr(sigmas[i])
        x = x.to(torch.float32)
        if i == 0 or i == last:
            # First order (DPM-Solver++ 1 = DDIM): no history yet, or the final step down to sigma 0.
            x = (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            h_prev = log_snr(sigmas[i]) - log_snr(sigmas[i - 1])
            d1 = (1.0 / (h_prev / h)) * (x0 - x0_prev)
            x = (
                (sigma_t / sigma_s) * x
                - (alpha_t * (torch.exp(-h) - 1.0)) * x0
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
            )
        x = x.to(x0.dtype)
        x0_prev = x0
        callback(i, x)
    return x


def log_snr(sigma: Tensor) -> Tensor:
    alpha, sigma = alpha_sigma(sigma)
    return torch.log(alpha) - torch.log(sigma)


def sample_dpmpp_2m_sde(model: Model, x: Tensor, schedule: Schedule, noise: Noise,
                        callback: Callback) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022) as diffusers' DPMSolverMultistepScheduler runs it with
    algorithm_type "sde-dpmsolver++": DPM-Solver++(2M)'s data prediction and midpoint history, with part of
    the noise replaced by fresh noise each step. Draws noise at every step, the last included (where it is
    scaled by 0), after the model call, as the reference does."""
    sigmas = schedule.sigmas
    last = len(schedule.timesteps) - 1
    x0_prev = None
    for i, t in enumerate(schedule.timesteps):
        eps = model(x, t)
        alpha_s, sigma_s = alpha_sigma(sigmas[i])
        x0 = (x - sigma_s * eps) / alpha_s
        x = x.to(torch.float32)
        fresh = noise(x)

        alpha_t, sigma_t = alpha_sigma(sigmas[i + 1])
        h = log_snr(sigmas[i + 1]) - log_snr(sigmas[i])
        decay = sigma_t / sigma_s * torch.exp(-h)
        x0_weight = alpha_t * (1 - torch.exp(-2.0 * h))
        fresh_scale = sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h))
        if i == 0 or i == last:
            x = decay * x + x0_weight * x0 + fresh_scale * fresh
        else:
            h_prev = log_snr(sigmas[i]) - log_snr(sigmas[i - 1])
            d1 = (1.0 / (h_prev / h)) * (x0 - x0_prev)
            x = decay * x + x0_weight * x0 + 0.5 * x0_weight * d1 + fresh_scale * fresh
        x = x.to(x0.dtype)
        x0_prev = x0
        callback(i, x)
    return x


def sample_unipc(model: Model, x: Tensor, schedule: Schedule, noise: Noise, callback: Callback) -> Tensor:
    """UniPC (Zhao et al. 2023) as diffusers' UniPCMultistepScheduler runs it by default: data prediction,
    B(h) = e^h - 1 (bh2), order 2, first order on the first and the last step. Each model call first corrects
    the x it was given (UniC, with the new x0), then predicts the next x from the corrected one (UniP): the
    callback sees the predictions. Steps in x's dtype. Draws no noise."""
    sigmas = schedule.sigmas
    total = len(schedule.timesteps)
    x0s: list[Tensor] = []  # the multistep history: the last two calls' x0 predictions, newest last
    x_before = order = None  # the x the last prediction started from, and that prediction's order
    for i, t in enumerate(schedule.timesteps):
        eps = model(x, t)
        alpha, sigma = alpha_sigma(sigmas[i])
        x0 = (x - sigma * eps) / alpha
        if i > 0:
            x = _unipc_update(x_before, x0s, sigmas, i - 1, order, x0)
        x0s = [*x0s[-1:], x0]
        order = min(2, total - i, i + 1)
        x_before = x
        x = _unipc_update(x, x0s, sigmas, i, order)
        callback(i, x)
    return x


def _unipc_update(x: Tensor, x0s: list[Tensor], sigmas: Tensor, i: int, order: int,
                  x0_next: Tensor | None = None) -> Tensor:
    """One UniPC update of x at step i (sigma i to sigma i + 1) from the x0 history x0s (newest last, the
    one at sigma i): the predictor UniP, or with x0_next, the model's x0 at sigma i + 1, the corrector UniC,
    which also fits x0_next. Operation for operation as the reference's multistep_uni_p/c_bh_update, on x's
    device as there."""
    device = x.device
    sigmas = sigmas.to(device)
    alpha_t, sigma_t = alpha_sigma(sigmas[i + 1])
    alpha_s0, sigma_s0 = alpha_sigma(sigmas[i])
    h = log_snr(sigmas[i + 1]) - log_snr(sigmas[i])
    m0 = x0s[-1]
    rks, d1s = [], []
    if order == 2:
        rk = (log_snr(sigmas[i - 1]) - log_snr(sigmas[i])) / h
        rks.append(rk)
        d1s.append((x0s[-2] - m0) / rk)
    rks.append(torch.ones((), device=device))
    rks = torch.stack(rks)

    hh = -h  # data prediction
    h_phi_1 = torch.expm1(hh)
    b_h = torch.expm1(hh)  # bh2
    d1s = torch.stack(d1s, dim=1) if d1s else None
    base = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
    if x0_next is None:
        rhos = torch.ones(1, dtype=x.dtype, device=device) * 0.5  # order 2; order 1 has no history term
        residual = torch.einsum("k,bkc...->bc...", rhos, d1s) if d1s is not None else 0
        return (base - alpha_t * b_h * residual).to(x.dtype)

    if order == 1:
        rhos = torch.ones(1, dtype=x.dtype, device=device) * 0.5
    else:
        # Solve for the weights that make the update exact to `order` (the paper's R rhos = b).
        powers, targets = [], []
        h_phi_k, factorial = h_phi_1 / hh - 1, 1
        for k in range(1, order + 1):
            powers.append(torch.pow(rks, k - 1))
            targets.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        rhos = torch.linalg.solve(torch.stack(powers), torch.stack(targets)).to(x.dtype)
    residual = torch.einsum("k,bkc...->bc...", rhos[:-1], d1s) if d1s is not None else 0
    return (base - alpha_t * b_h * (residual + rhos[-1] * (x0_next - m0))).to(x.dtype)


def sample_lms(model: Model, x: Tensor, schedule: Schedule, noise: Noise, callback: Callback,
               order: int = 4) -> Tensor:
    """Linear multistep (k-diffusion's sample_lms) as diffusers' LMSDiscreteScheduler runs it: x moves by the
    integral of the polynomial through the last `order` slopes, in sigma space. Steps in x's dtype.

    The order grows with the step's index in the whole schedule, not with the history it has: an img2img tail
    starts with the coefficients of a full-order step, of which it uses those it has slopes for (the
    reference's behaviour, kept for equality)."""
    sigmas = torch.cat([schedule.skipped_sigmas, schedule.sigmas])
    start = len(schedule.skipped_sigmas)
    sigmas_np = sigmas.numpy()
    slopes: list[Tensor] = []  # the multistep history, newest first
    for i, t in enumerate(schedule.timesteps):
        index = start + i
        sigma = sigmas[index]
        eps = model(x / ((sigma**2 + 1) ** 0.5), t)
        x0 = x - sigma * eps
        slopes = [(x - x0) / sigma, *slopes[: order - 1]]
        step_order = min(index + 1, order)
        coefficients = [lms_coefficient(sigmas_np, index, step_order, j)
                        for j in range(min(step_order, len(slopes)))]
        x = x + sum(c * slope for c, slope in zip(coefficients, slopes, strict=True))
        callback(i, x)
    return x


def lms_coefficient(sigmas: np.ndarray, i: int, order: int, j: int) -> float:
    """The weight of the slope at sigma_{i-j} in LMS step i of that order: the integral from sigma_i to
    sigma_{i+1} of the Lagrange basis polynomial of sigma_{i-j} over sigma_i, ..., sigma_{i-order+1}.

    As the reference computes it: quad(epsrel=1e-4) over an integrand evaluated in fp32 (it multiplies torch
    fp32 scalars), so it equals the reference's to the bit (see quadpack)."""

    def basis(tau: np.ndarray) -> list[float]:
        tau, value = tau.astype(np.float32), None
        for k in range(order):
            if k != j:
                factor = (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
                value = factor if value is None else value * factor
        return [1.0] * len(tau) if value is None else value.astype(np.float64).tolist()

    return quadpack.quad(basis, float(sigmas[i]), float(sigmas[i + 1]))


def sample_plms(model: Model, x: Tensor, schedule: Schedule, noise: Noise, callback: Callback) -> Tensor:
    """PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022), as diffusers' PNDMScheduler runs it
    with skip_prk_steps: each step from t to t - 1000 // steps combines the last four eps (Adams-Bashforth
    weights) in DDIM's transfer. The first step has no history: its second call (the repeated timestep of
    plms_schedule) redoes it with the mean eps of both of its ends. Steps in x's dtype. Draws no noise.

    Like the reference, it reads its place from the call count and t alone, never from the next timestep: an
    img2img tail (which drops the repeat, or starts on it) runs exactly as diffusers runs it."""
    stride = TRAIN_STEPS // schedule.steps
    history: list[Tensor] = []  # the multistep history: up to the last four eps, newest last
    x_start = None
    for i, t in enumerate(schedule.timesteps):
        eps = model(x, t)
        if i == 1:
            # The second call ends the first step: redo it from where it started with the mean eps.
            t_from, t_to = t + stride, t
            eps = (eps + history[-1]) / 2
            x = x_start
        else:
            t_from, t_to = t, t - stride
            history = [*history[-3:], eps]
            if len(history) == 1:
                x_start = x
            elif len(history) == 2:
                eps = (3 * history[-1] - history[-2]) / 2
            elif len(history) == 3:
                eps = (23 * history[-1] - 16 * history[-2] + 5 * history[-3]) / 12
            else:
                eps = (1 / 24) * (55 * history[-1] - 59 * history[-2] + 37 * history[-3] - 9 * history[-4])
        x = _pndm_transfer(x, t_from, t_to, eps)
        callback(i, x)
    return x


def _pndm_transfer(x: Tensor, t: Tensor, t_to: Tensor, eps: Tensor) -> Tensor:
    """x at t moved to t_to along eps (PNDM's eq. 11, DDIM's update); below t = 0 it lands on
    alphas_cumprod[0] (set_alpha_to_one False)."""
    alpha_prod = ALPHAS_CUMPROD[t]
    alpha_prod_to = ALPHAS_CUMPROD[t_to] if t_to >= 0 else ALPHAS_CUMPROD[0]
    x_coeff = (alpha_prod_to / alpha_prod) ** 0.5
    eps_denominator = alpha_prod * (1 - alpha_prod_to) ** 0.5 + (
        alpha_prod * (1 - alpha_prod) * alpha_prod_to
    ) ** 0.5
    return x_coeff * x - (alpha_prod_to - alpha_prod) * eps / eps_denominator


def sample_lcm(model: Model, x: Tensor, schedule: Schedule, noise: Noise, callback: Callback) -> Tensor:
    """Latent consistency model sampling (Luo et al. 2023) as diffusers' LCMScheduler runs it: each call's
    x0, mixed with x by the consistency boundary condition, is the step's result; between steps it is noised
    to the next timestep with fresh noise (drawn after the model call, in x's dtype). The last draws none."""
    timesteps = schedule.timesteps
    last = len(timesteps) - 1
    for i, t in enumerate(timesteps):
        eps = model(x, t)
        alpha_prod = ALPHAS_CUMPROD[t]
        # c_skip and c_out at sigma_data 0.5, with t scaled by 10 (timestep_scaling), in fp32.
        scaled = t * 10.0
        c_skip = 0.5**2 / (scaled**2 + 0.5**2)
        c_out = scaled / (scaled**2 + 0.5**2) ** 0.5
        x0 = (x - (1 - alpha_prod).sqrt() * eps) / alpha_prod.sqrt()
        denoised = c_out * x0 + c_skip * x
        if i < last:
            alpha_prod_next = ALPHAS_CUMPROD[timesteps[i + 1]]
            x = alpha_prod_next.sqrt() * denoised + (1 - alpha_prod_next).sqrt() * noise(denoised)
        else:
            x = denoised
        callback(i, x)
    return x
