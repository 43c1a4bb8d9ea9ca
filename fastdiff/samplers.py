"""Every sampler as a table of coefficients for one linear map (DESIGN.md).

The state x is always on the variance-preserving path, x = alpha x0 + sigma eps, so it is also
the network's input (the sigma-space samplers' input scaling 1/sqrt(1 + s^2) is folded into their
coefficients). Each row of a plan is one network evaluation:

    x0      = A x + B y                                  (y: the network output; guided or not)
    x_next  = X_X x + X_D x0 + X_H0 h0 + X_H1 h1 + X_Z z    (z: noise of row r, step r + 1)
    h0_new  = H0_X x + H0_D x0 + H0_H0 h0 + H0_H1 h1        (written only where W0 = 1)
    h1_new  = H1_X x + H1_D x0 + H1_H0 h0 + H1_H1 h1        (written only where W1 = 1)

h0 and h1 are the history: earlier x0 predictions (multistep methods, used as a ring buffer),
the first-stage x0 (Heun) or the previous corrected sample (UniPC). A sampler below is a function
of the schedule that returns these rows, built in float64 on the host; A and B come from the
parameterization. Nothing else differs between samplers: one step op applies any row.

Noise levels are handled as VE sigmas s = sqrt((1 - abar) / abar); alpha = 1/sqrt(1 + s^2) and
sigma = s alpha on the VP path, lambda = log(alpha / sigma) = -log s.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import torch

from fastdiff import parameterization
from fastdiff.schedules import (
    SPACINGS,
    Schedule,
    exponential_sigmas,
    karras_sigmas,
    spaced_timesteps,
)


class Col(IntEnum):
    """Columns of a plan's coefficient table."""

    T = 0  # training timestep passed to the network
    ALPHA = 1  # VP coefficients of the network input point
    SIGMA = 2
    A = 3  # x0 = A x + B y
    B = 4
    X_X = 5
    X_D = 6
    X_H0 = 7
    X_H1 = 8
    X_Z = 9
    H0_X = 10
    H0_D = 11
    H0_H0 = 12
    H0_H1 = 13
    H1_X = 14
    H1_D = 15
    H1_H0 = 16
    H1_H1 = 17
    W0 = 18
    W1 = 19


NCOEF = len(Col)
_OPERANDS = ("x", "d", "h0", "h1")  # d: the current x0 prediction


@dataclass
class Plan:
    """A sampler applied to a schedule: the coefficient table and what the loop needs."""

    sampler: str
    table: torch.Tensor  # (rows, NCOEF) float64
    n_history: int
    init_scale: float  # x_T = init_scale * unit noise
    prediction: str

    @property
    def rows(self) -> int:
        return self.table.shape[0]

    @property
    def timesteps(self) -> torch.Tensor:
        return self.table[:, Col.T]

    @property
    def noisy_rows(self) -> list[bool]:
        return (self.table[:, Col.X_Z] != 0).tolist()

    @property
    def stochastic(self) -> bool:
        return any(self.noisy_rows)


@dataclass
class _Rows:
    """Rows under construction. Linear combinations are dicts {operand: coefficient} over
    x, d (x0 now), h0, h1 and z."""

    rows: list[list[float]] = field(default_factory=list)
    n_history: int = 0
    init_scale: float = 1.0

    def add(
        self,
        t: float,
        s: float,
        x_next: dict[str, float],
        h0: dict[str, float] | None = None,
        h1: dict[str, float] | None = None,
    ) -> None:
        alpha, sigma = _vp(s)
        r = [0.0] * NCOEF
        r[Col.T], r[Col.ALPHA], r[Col.SIGMA] = float(t), alpha, sigma
        for k, v in x_next.items():
            r[Col[f"X_{k.upper()}"]] = v
        for slot, combo in (("H0", h0), ("H1", h1)):
            if combo is not None:
                r[Col[f"W{slot[1]}"]] = 1.0
                for k, v in combo.items():
                    r[Col[f"{slot}_{k.upper()}"]] = v
        self.rows.append(r)


def _vp(s: float) -> tuple[float, float]:
    """(alpha, sigma) on the VP path for VE noise level s."""
    alpha = 1.0 / math.sqrt(1.0 + s * s)
    return alpha, s * alpha


def _lin(*terms: tuple[float, dict[str, float]]) -> dict[str, float]:
    """sum_k c_k * combo_k for linear combinations stored as dicts."""
    out: dict[str, float] = {}
    for c, combo in terms:
        for k, v in combo.items():
            out[k] = out.get(k, 0.0) + c * v
    return out


def _e(name: str) -> dict[str, float]:
    return {name: 1.0}


# ---------------------------------------------------------------------------------------------
# timestep / sigma grids


def _sigma_grid(
    schedule: Schedule, steps: int, spacing: str, *, multistep: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(t, s): `steps` model timesteps and steps + 1 VE sigmas (the last one 0).

    Discrete spacings interpolate sigma at the (fractional, for linspace) timesteps; the
    sigma-grid spacings (karras, exponential) span the schedule's whole sigma range and map
    sigmas back to timesteps by log-sigma interpolation. Multistep solvers use the rounded
    grid over steps + 1 points (as diffusers' DPMSolver and UniPC do)."""
    T = schedule.num_train_timesteps
    if spacing in ("karras", "exponential"):
        lo, hi = float(schedule.sigmas[0]), float(schedule.sigmas[-1])
        make = karras_sigmas if spacing == "karras" else exponential_sigmas
        s = make(lo, hi, steps)
        t = schedule.t_at(s)
        if multistep:  # integer timesteps, as diffusers' multistep solvers have them
            t = t.round() if spacing == "karras" else t.floor()
    else:
        t = spaced_timesteps(T, steps, spacing, extra_point=multistep, rounded=multistep)
        s = schedule.sigma_at(t)
    return t.numpy(), np.append(s.numpy(), 0.0)


def _abar_steps(
    schedule: Schedule, steps: int, spacing: str, *, ddim_prev: bool
) -> list[tuple[float, float, float]]:
    """(t, abar, abar_next) per step for the samplers that step between abar values.

    On discrete spacings: like diffusers, DDIM steps from t to t - T // steps and lands on
    abar[0] (set_alpha_to_one=False), DDPM steps to the next grid timestep and lands on 1.
    On sigma grids (karras, exponential) both step to the next grid point and land on s = 0."""
    abar = schedule.alphas_cumprod.numpy()
    if spacing in ("karras", "exponential"):
        t, s = _sigma_grid(schedule, steps, spacing)
        ab = 1 / (1 + s * s)
        return [(t[i], ab[i], ab[i + 1]) for i in range(steps)]
    t = spaced_timesteps(schedule.num_train_timesteps, steps, spacing).numpy().astype(np.int64)
    if ddim_prev:
        prev = t - schedule.num_train_timesteps // steps
        return [(ti, abar[ti], abar[pi] if pi >= 0 else abar[0]) for ti, pi in zip(t, prev)]
    nxt = [abar[tn] for tn in t[1:]] + [1.0]
    return [(ti, abar[ti], ab_p) for ti, ab_p in zip(t, nxt)]


# ---------------------------------------------------------------------------------------------
# samplers


def ddim(schedule: Schedule, steps: int, spacing: str, *, eta: float = 0.0) -> _Rows:
    """DDIM (Song et al. 2021, eq. 12), any eta."""
    out = _Rows()
    for t, ab, ab_p in _abar_steps(schedule, steps, spacing, ddim_prev=True):
        alpha, sigma = math.sqrt(ab), math.sqrt(1 - ab)
        std = eta * math.sqrt((1 - ab_p) / (1 - ab) * (1 - ab / ab_p))
        c = math.sqrt(max(1 - ab_p - std * std, 0.0))  # weight of the predicted noise
        # x_prev = sqrt(abar_prev) x0 + c eps_hat + std z, eps_hat = (x - alpha x0) / sigma
        out.add(t, _ve(ab), {"x": c / sigma, "d": math.sqrt(ab_p) - c * alpha / sigma, "z": std})
    return out


def ddpm(schedule: Schedule, steps: int, spacing: str) -> _Rows:
    """DDPM ancestral sampling (Ho et al. 2020, eq. 7): the posterior q(x_prev | x_t, x0) with
    the "fixed small" variance, over any subsequence of the training steps; no noise is added
    on the step that lands on t = 0 (abar = 1)."""
    out = _Rows()
    for t, ab, ab_p in _abar_steps(schedule, steps, spacing, ddim_prev=False):
        a_t = ab / ab_p
        b_t = 1 - a_t
        var = max((1 - ab_p) / (1 - ab) * b_t, 1e-20)
        z = math.sqrt(var) if t > 0 and ab_p < 1 else 0.0
        mean = {"x": math.sqrt(a_t) * (1 - ab_p) / (1 - ab), "d": math.sqrt(ab_p) * b_t / (1 - ab)}
        out.add(t, _ve(ab), {**mean, "z": z})
    return out


def _ve(ab: float) -> float:
    return math.sqrt((1 - ab) / ab)


def _euler_init(s0: float, spacing: str) -> float:
    # diffusers starts the sigma-space samplers at init_noise_sigma * unit noise: sigma_max for
    # linspace/trailing/sigma grids, sqrt(sigma_max^2 + 1) for leading; on the VP path:
    return 1.0 if spacing == "leading" else s0 / math.sqrt(1 + s0 * s0)


def _ve_step(s: float, s_next: float, p: float) -> dict[str, float]:
    """The VE update x' = p x + (1 - p) x0 from s to s_next, on the VP path."""
    a, a_next = _vp(s)[0], _vp(s_next)[0]
    return {"x": p * a_next / a, "d": (1 - p) * a_next}


def euler(schedule: Schedule, steps: int, spacing: str) -> _Rows:
    """Euler's method on the probability-flow ODE dx/ds = (x - x0) / s (Karras et al. 2022,
    Alg. 1 without churn)."""
    t, s = _sigma_grid(schedule, steps, spacing)
    out = _Rows(init_scale=_euler_init(s[0], spacing))
    for i in range(steps):
        out.add(t[i], s[i], _ve_step(s[i], s[i + 1], s[i + 1] / s[i]))
    return out


def euler_a(schedule: Schedule, steps: int, spacing: str, *, eta: float = 1.0) -> _Rows:
    """Euler ancestral (k-diffusion): an Euler step down to sigma_down, then fresh noise of
    std sigma_up, with sigma_down^2 + sigma_up^2 = s_next^2."""
    t, s = _sigma_grid(schedule, steps, spacing)
    out = _Rows(init_scale=_euler_init(s[0], spacing))
    for i in range(steps):
        si, sn = s[i], s[i + 1]
        up = min(sn, eta * math.sqrt(sn * sn * (si * si - sn * sn) / (si * si)))
        down = math.sqrt(sn * sn - up * up)
        combo = _ve_step(si, sn, down / si)
        combo["z"] = up * _vp(sn)[0]
        out.add(t[i], si, combo)
    return out


# Heun's first corrector adds (s0 - s1) / 2 times the change in the predicted noise to a sample of
# scale max(1, s1); above this ratio it is warned about. Stable Diffusion's schedule gives at most
# 7 (2 steps); a cosine schedule clipped at beta 0.999 (sigma_max 2e4) gives ~1600 at 10 steps.
HEUN_MAX_CORRECTOR_GAIN = 50.0


def heun(schedule: Schedule, steps: int, spacing: str) -> _Rows:
    """Heun's second-order method (Karras et al. 2022, Alg. 1): an Euler predictor to s_next,
    then the trapezoidal corrector; the last step (to s = 0) is Euler only. 2 steps - 1 rows.

    With dt = s_next - s, the predictor x_p = x + dt d1 and the corrector x_p + dt/2 (d2 - d1).
    h0 keeps d1 = eps_1 = (x - alpha x0_1) / sigma, which stays accurate where s_next << s
    (x0_1 itself would carry an error of order s eps_mach into a term scaled by s / s_next)."""
    t, s = _sigma_grid(schedule, steps, spacing)
    gain = (s[0] - s[1]) / (2 * max(1.0, s[1])) if steps > 1 else 0.0
    if gain > HEUN_MAX_CORRECTOR_GAIN:
        warnings.warn(
            f"heun: the first step goes from sigma {s[0]:.4g} to {s[1]:.4g}; its trapezoidal "
            f"corrector adds the change in the predicted noise times {(s[0] - s[1]) / 2:.4g}, "
            f"{gain:.0f} times the scale of the sample: expect unusable samples (diffusers' "
            "HeunDiscreteScheduler gives the same). Use spacing='leading', another sampler, "
            "or a schedule with a smaller sigma_max.",
            stacklevel=3,
        )
    out = _Rows(n_history=1, init_scale=_euler_init(s[0], spacing))
    for i in range(steps):
        si, sn = s[i], s[i + 1]
        alpha, sigma = _vp(si)
        eps_1 = {"x": 1 / sigma, "d": -alpha / sigma}
        out.add(t[i], si, _ve_step(si, sn, sn / si), h0=eps_1 if sn > 0 else None)
        if sn > 0:
            # x_next = x_p + dt/2 ((x_p - x0_2) / s_next - eps_1), on the VP path at s_next
            a_n, dt = _vp(sn)[0], sn - si
            out.add(
                t[i + 1],
                sn,
                {"x": 1 + dt / (2 * sn), "d": -a_n * dt / (2 * sn), "h0": -a_n * dt / 2},
            )
    return out


def _multistep_order(i: int, n: int, order: int) -> int:
    """diffusers' DPMSolverMultistep order rule: warm up from first order, first order at the
    last step (the final sigma is 0), second order before it when steps < 15."""
    if order == 1 or i < 1 or i == n - 1:
        return 1
    if order == 2 or i < 2 or (i == n - 2 and n < 15):
        return 2
    return 3


def _lambda(s: float) -> float:
    return math.inf if s == 0 else -math.log(s)


def _dpmpp(schedule: Schedule, steps: int, spacing: str, order: int, sde: bool) -> _Rows:
    """DPM-Solver++ multistep (Lu et al. 2022, Alg. 2, midpoint form) and its SDE variant, with
    the previous x0 predictions in a ring buffer of order - 1 slots."""
    t, s = _sigma_grid(schedule, steps, spacing, multistep=True)
    out = _Rows(n_history=order - 1)
    slots = ("h0", "h1")[: order - 1]
    for i in range(steps):
        o = _multistep_order(i, steps, order)
        # m_k: the x0 prediction k steps ago; slot i % (order - 1) takes this step's x0
        m = ["d"] + [slots[(i - k) % len(slots)] for k in range(1, order)] if slots else ["d"]
        a_t, sg_t = _vp(s[i + 1])
        lam_t, lam = _lambda(s[i + 1]), [_lambda(s[i - k]) if i >= k else 0.0 for k in range(3)]
        h = lam_t - lam[0]
        eh = 0.0 if math.isinf(h) else math.exp(-h)
        if sde:
            x_coef = sg_t / _vp(s[i])[1] * eh
            c = [a_t * (1 - eh * eh), 0.5 * a_t * (1 - eh * eh)]
            if o == 3:
                c = [
                    a_t * (1 - eh * eh),
                    a_t * ((1 - eh * eh) / (-2 * h) + 1),
                    # + 0.5: the ODE coefficient below with h -> 2h (k-diffusion's phi_3);
                    # diffusers 0.42 has - 0.5 here, which diverges as steps grow (README)
                    a_t * ((1 - eh * eh - 2 * h) / (2 * h) ** 2 + 0.5),
                ]
        else:
            x_coef = sg_t / _vp(s[i])[1]
            c = [-a_t * (eh - 1), -0.5 * a_t * (eh - 1)]
            if o == 3:
                c = [
                    -a_t * (eh - 1),
                    a_t * ((eh - 1) / h + 1),
                    -a_t * ((eh - 1 + h) / h**2 - 0.5),
                ]
        combo = _lin((x_coef, _e("x")), (c[0], _e(m[0])))
        if o == 2:  # D1 = (m0 - m1) / r0
            r0 = (lam[0] - lam[1]) / h
            combo = _lin((1.0, combo), (c[1] / r0, _e(m[0])), (-c[1] / r0, _e(m[1])))
        elif o == 3:
            r0, r1 = (lam[0] - lam[1]) / h, (lam[1] - lam[2]) / h
            d10 = _lin((1 / r0, _e(m[0])), (-1 / r0, _e(m[1])))
            d11 = _lin((1 / r1, _e(m[1])), (-1 / r1, _e(m[2])))
            diff = _lin((1.0, d10), (-1.0, d11))
            d1 = _lin((1.0, d10), (r0 / (r0 + r1), diff))
            d2 = _lin((1 / (r0 + r1), diff))
            combo = _lin((1.0, combo), (c[1], d1), (c[2], d2))
        if sde:
            combo["z"] = sg_t * math.sqrt(1 - eh * eh)
        writes = {f"h{k}": None for k in range(2)}
        if slots:
            writes[slots[i % len(slots)]] = _e("d")
        out.add(t[i], s[i], combo, **writes)
    return out


def dpmpp_2m(schedule: Schedule, steps: int, spacing: str) -> _Rows:
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in log-SNR, data prediction."""
    return _dpmpp(schedule, steps, spacing, order=2, sde=False)


def dpmpp_2m_sde(schedule: Schedule, steps: int, spacing: str) -> _Rows:
    """DPM-Solver++(2M) SDE: the second-order multistep solver of the reverse SDE."""
    return _dpmpp(schedule, steps, spacing, order=2, sde=True)


def dpmpp_3m_sde(schedule: Schedule, steps: int, spacing: str) -> _Rows:
    """DPM-Solver++(3M) SDE: the third-order multistep solver of the reverse SDE."""
    return _dpmpp(schedule, steps, spacing, order=3, sde=True)


def unipc(schedule: Schedule, steps: int, spacing: str) -> _Rows:
    """UniPC (Zhao et al. 2023), bh2, data prediction, order 2: the UniP predictor and the UniC
    corrector. The corrector refines x_i with the x0 just predicted there, before the next
    predictor step; h0 keeps the corrected sample, h1 the previous x0.

    An order-2 corrector needs x0 from two steps back; it is recovered from x_i itself (the
    order-2 predictor that produced x_i is invertible in it), so two history slots suffice."""
    t, s = _sigma_grid(schedule, steps, spacing, multistep=True)
    lam = [_lambda(v) for v in s]
    out = _Rows(n_history=2)
    prev_pred: dict[str, float] | None = None  # x_i over (h0, h1, m2): the previous predictor
    prev_order = 0
    for i in range(steps):
        # UniC: correct x_i (input "x") with d = x0_i. last = h0, m0 = h1, m1 = x0_{i-2}.
        if i > 0:
            xc = _unipc_combo(lam, s, i, i - 1, prev_order, last="h0", ms=["h1", "m2"], corr="d")
            if "m2" in xc:  # eliminate x0_{i-2} through x_i = prev_pred
                k = xc.pop("m2") / prev_pred["m2"]
                rest = {n: v for n, v in prev_pred.items() if n != "m2"}
                xc = _lin((1.0, xc), (k, _e("x")), (-k, rest))
        else:
            xc = _e("x")
        order = min(2, steps - i, i + 1)
        # UniP: predict x_{i+1} from xc with m0 = d, m1 = h1 (= x0_{i-1})
        pred = _unipc_combo(lam, s, i + 1, i, order, last="xc", ms=["d", "h1"])
        rest = {k: v for k, v in pred.items() if k != "xc"}
        out.add(t[i], s[i], _lin((pred.get("xc", 0.0), xc), (1.0, rest)), h0=xc, h1=_e("d"))
        # x_{i+1} over the next row's operands: h0 = xc_i, h1 = x0_i, m2 = x0_{i-1}
        rename = {"xc": "h0", "d": "h1", "h1": "m2"}
        prev_pred = {rename[k]: v for k, v in pred.items()}
        prev_order = order
    return out


def _unipc_combo(
    lam: list[float],
    s: list[float],
    it: int,
    i0: int,
    order: int,
    last: str,
    ms: list[str],
    corr: str | None = None,
) -> dict[str, float]:
    """One UniP (corr=None) or UniC (corr = the new x0) bh2 update from grid point i0 to it.
    `last` is the sample at i0, ms[k] the x0 prediction at point i0 - k."""
    a_t, sg_t = _vp(s[it])
    sg_0 = _vp(s[i0])[1]
    if sg_t == 0:  # the final step is first order and lands on x0
        return {ms[0]: 1.0}
    h = lam[it] - lam[i0]
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh)
    rks = [(lam[i0 - k] - lam[i0]) / h for k in range(1, order)] + [1.0]
    rhs, h_phi_k, fact = [], h_phi_1 / hh - 1, 1
    for j in range(1, order + 1):
        rhs.append(h_phi_k * fact / b_h)
        fact *= j + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    R = np.array([[r ** (j - 1) for r in rks] for j in range(1, order + 1)])
    combo = _lin((sg_t / sg_0, _e(last)), (-a_t * h_phi_1, _e(ms[0])))
    # D1_k = (m_k - m0) / r_k
    d1s = [_lin((1 / rks[k - 1], _e(ms[k])), (-1 / rks[k - 1], _e(ms[0]))) for k in range(1, order)]
    if corr is None:
        rhos = [0.5] if order == 2 else []
        terms = [(rho, d) for rho, d in zip(rhos, d1s)]
    else:
        rhos = [0.5] if order == 1 else list(np.linalg.solve(R, np.array(rhs)))
        d1_t = _lin((1.0, _e(corr)), (-1.0, _e(ms[0])))
        terms = [(rho, d) for rho, d in zip(rhos[:-1], d1s)] + [(rhos[-1], d1_t)]
    for rho, d in terms:
        combo = _lin((1.0, combo), (-a_t * b_h * rho, d))
    return combo


SAMPLERS: dict[str, Callable[..., _Rows]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "euler_a": euler_a,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "dpmpp_3m_sde": dpmpp_3m_sde,
    "unipc": unipc,
}


def build_plan(
    sampler: str,
    schedule: Schedule,
    steps: int,
    *,
    spacing: str = "trailing",
    prediction: str = "eps",
    **options,
) -> Plan:
    """The coefficient table of `sampler` with `steps` steps on `schedule`.

    `options` are the sampler's own keyword arguments (e.g. eta for ddim)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {sorted(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    T = schedule.num_train_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and num_train_timesteps={T}, got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; valid spacings: {list(SPACINGS)}")
    prediction = parameterization.canonical(prediction)
    fn = SAMPLERS[sampler]
    try:
        built = fn(schedule, int(steps), spacing, **options)
    except TypeError as e:
        if "unexpected keyword" not in str(e):
            raise
        raise TypeError(f"sampler {sampler!r} does not take options {sorted(options)}") from None
    table = torch.tensor(built.rows, dtype=torch.float64)
    a, b = parameterization.x0_coefficients(prediction, table[:, Col.ALPHA], table[:, Col.SIGMA])
    table[:, Col.A], table[:, Col.B] = a, b
    if not torch.isfinite(table).all():
        raise ValueError(
            f"sampler {sampler!r} with {steps} steps ({spacing} spacing) on {schedule} gives "
            "non-finite coefficients (eps prediction at zero signal needs v or x0 prediction)"
        )
    return Plan(sampler, table, built.n_history, built.init_scale, prediction)
