"""The part of QUADPACK's dqagse (scipy.integrate.quad on a finite interval) that LMS needs, to the bit.

diffusers' LMSDiscreteScheduler integrates its coefficients with quad(epsrel=1e-4). On a polynomial of
degree < 4 the first 21-point Gauss-Kronrod estimate is exact, but quad's error estimate sees the fp32
rounding of the reference's integrand and, for about 1 coefficient in 1,300 on SD 1.5's schedules, rejects
it and bisects once; the halves' sum differs from the estimate by up to a few 1e-6 relative. So this follows
dqagse (scipy's C translation, scipy/integrate/__quadpack.c) operation for operation up to its first
bisection, which on every schedule of 1..999 steps passes its test: a second one never happens (checked
against quad for each coefficient of each of those schedules).
"""

from collections.abc import Callable

import numpy as np

EPSABS, EPSREL = 1.49e-8, 1e-4  # quad's default absolute tolerance, and the reference's relative one
EPMACH, UFLOW = np.finfo(np.float64).eps, np.finfo(np.float64).tiny

# dqk21's 21-point Kronrod nodes on [0, 1] of [-1, 1] (xgk), their weights (wgk), and the weights of the
# 10-point Gauss rule on the odd nodes (wg), which gives the error estimate.
KRONROD_NODES = (
    0.995657163025808080735527280689003, 0.973906528517171720077964012084452,
    0.930157491355708226001207180059508, 0.865063366688984510732096688423493,
    0.780817726586416897063717578345042, 0.679409568299024406234327365114874,
    0.562757134668604683339000099272694, 0.433395394129247190799265943165784,
    0.294392862701460198131126603103866, 0.148874338981631210884826001129720, 0.0,
)
KRONROD_WEIGHTS = (
    0.011694638867371874278064396062192, 0.032558162307964727478818972459390,
    0.054755896574351996031381300244580, 0.075039674810919952767043140916190,
    0.093125454583697605535065465083366, 0.109387158802297641899210590325805,
    0.123491976262065851077958109831074, 0.134709217311473325928054001771707,
    0.142775938577060080797094273138717, 0.147739104901338491374841515972068,
    0.149445554002916905664936468389821,
)
GAUSS_WEIGHTS = (
    0.066671344308688137593568809893332, 0.149451349150580593145776339657697,
    0.219086362515982043995534934228163, 0.269266719309996355091226921569469,
    0.295524224714752870173892994651338,
)
NODE_ORDER = (1, 3, 5, 7, 9, 0, 2, 4, 6, 8)  # dqk21 sums the Gauss nodes' pairs first, then the others

Integrand = Callable[[np.ndarray], list[float]]  # float64 points -> the integrand's values there


def quad(f: Integrand, a: float, b: float) -> float:
    """scipy.integrate.quad(f, a, b, epsrel=1e-4)[0] for an f that needs at most one bisection."""
    if b < a:
        return -quad(f, b, a)  # quad integrates from the lower limit and negates
    result, error, resabs, resasc = kronrod21(f, a, b)
    bound = max(EPSABS, EPSREL * abs(result))
    roundoff = error <= 100.0 * EPMACH * resabs and error > bound
    if roundoff or (error <= bound and error != resasc) or error == 0.0:
        return result
    middle = 0.5 * (a + b)
    return kronrod21(f, a, middle)[0] + kronrod21(f, middle, b)[0]


def kronrod21(f: Integrand, a: float, b: float) -> tuple[float, float, float, float]:
    """dqk21: the 21-point estimate of the integral of f over [a, b], its error estimate, and the integrals of
    |f| and of |f - mean| (dqagse's tests read them)."""
    center, half = 0.5 * (a + b), 0.5 * (b - a)
    points = [center]
    for k in NODE_ORDER:
        offset = half * KRONROD_NODES[k]
        points += [center - offset, center + offset]
    values = f(np.array(points))
    at_center, left, right = values[0], {}, {}
    gauss, kronrod = 0.0, KRONROD_WEIGHTS[10] * at_center
    resabs = abs(kronrod)
    for n, k in enumerate(NODE_ORDER):
        left[k], right[k] = values[1 + 2 * n], values[2 + 2 * n]
        pair = left[k] + right[k]
        if n < 5:
            gauss = gauss + GAUSS_WEIGHTS[n] * pair
        kronrod = kronrod + KRONROD_WEIGHTS[k] * pair
        resabs = resabs + KRONROD_WEIGHTS[k] * (abs(left[k]) + abs(right[k]))
    mean = kronrod * 0.5
    resasc = KRONROD_WEIGHTS[10] * abs(at_center - mean)
    for k in range(10):
        resasc = resasc + KRONROD_WEIGHTS[k] * (abs(left[k] - mean) + abs(right[k] - mean))
    resabs, resasc = resabs * abs(half), resasc * abs(half)
    error = abs((kronrod - gauss) * half)
    if resasc != 0.0 and error != 0.0:
        error = resasc * min(1.0, (200.0 * error / resasc) ** 1.5)
    if resabs > UFLOW / (50.0 * EPMACH):
        error = max(EPMACH * 50.0 * resabs, error)
    return kronrod * half, error, resabs, resasc
