"""Scaling-law fits with bootstrap intervals: L(C) = E + A·C^(−α), IsoFLOP optima, crossovers.

Pure NumPy, no plotting. The power law is fitted as Chinchilla's approach 3 (Hoffmann et al. 2022):
a Huber loss (δ = 1e-3) on the log of the loss, log L ≈ log(E + A·C^(−α)) = logaddexp(e, a − α·log C)
with E = e^e, A = e^a (both positive), from several starts (the best of a grid over α and E, with A
by least squares), each refined by Levenberg–Marquardt on the iteratively reweighted (Huber) squares.
The B bootstrap refits (runs resampled with replacement) run batched, as one array program, each from
the point fit and the grid's best starts. Intervals are the 2.5 / 97.5
percentiles of the bootstrap refits (the refit of Chinchilla by Besiroglu et al. 2024 showed why point
fits alone mislead).

    fit = fit_power_law(compute, loss)          # PowerLawFit(E, A, alpha, ci, residuals, samples)
    fit.predict(1e18)                           # L at that compute
    n_opt, l_opt = isoflop_optimum(params, loss)  # one budget's IsoFLOP curve: a parabola in log N
    size = fit_optimal_size(budgets, n_opts)    # N_opt = k·C^a with an interval on a
    cross = crossover(fit_a, fit_b)             # where the two fitted curves meet, or None
"""

from __future__ import annotations

import dataclasses

import numpy as np

HUBER_DELTA = 1e-3  # Chinchilla's, on log-loss residuals
_PERCENTILES = (2.5, 97.5)


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
  """L(C) = E + A·C^(−α) fitted to runs (compute C, loss L).

  ci: {"E", "A", "alpha"} -> (low, high), the 95% bootstrap interval. residuals [n]: log L − log L̂ of the
  runs. samples [B, 3]: the bootstrap refits' (E, A, alpha). compute_range: (min, max) compute of the runs.
  """
  E: float
  A: float
  alpha: float
  ci: dict
  residuals: np.ndarray
  samples: np.ndarray
  compute_range: tuple

  def predict(self, compute):
    """The fitted loss at `compute` (a number or an array)."""
    return self.E + self.A * np.asarray(compute, np.float64) ** -self.alpha


@dataclasses.dataclass(frozen=True)
class OptimalSizeFit:
  """N_opt = coefficient · C^exponent, with the exponent's 95% bootstrap interval `ci`."""
  exponent: float
  coefficient: float
  ci: tuple

  def predict(self, compute):
    return self.coefficient * np.asarray(compute, np.float64) ** self.exponent


@dataclasses.dataclass(frozen=True)
class Crossover:
  """The compute where two fitted curves meet, its 95% bootstrap interval (over the refits that cross in
  the range) and the fraction of refit pairs that cross there at all."""
  compute: float
  ci: tuple
  fraction: float


def _check_runs(x, y, fn: str, min_points: int = 4):
  x, y = np.asarray(x, np.float64).reshape(-1), np.asarray(y, np.float64).reshape(-1)
  if x.shape != y.shape:
    raise ValueError(f"{fn}: got {x.size} x values and {y.size} losses; pass one of each per run.")
  if x.size < min_points:
    raise ValueError(f"{fn}: {x.size} runs are too few to fit; pass at least {min_points}.")
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0) and np.all(y > 0)):
    raise ValueError(f"{fn}: every x value and loss must be a finite positive number.")
  return x, y


def _huber(r, delta):
  a = np.abs(r)
  return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _log_model(theta, u):
  """log(E + A'·exp(−α u)) for theta [..., 3] = (log E, log A', α) and u [..., n]."""
  e, a, alpha = theta[..., 0:1], theta[..., 1:2], theta[..., 2:3]
  return np.logaddexp(e, a - alpha * u)


def _objective(theta, u, y, delta):
  return _huber(y - _log_model(theta, u), delta).sum(-1)


def _starts(u, y, k: int):
  """The k best (log E, log A', α) of a grid over α and E (A' by least squares on L − E), per row of u / y
  [..., n]: [..., k, 3]."""
  L = np.exp(y)
  alphas = np.linspace(0.02, 2.0, 40)
  fractions = np.array([1e-3, 0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.995])
  E = L.min(-1, keepdims=True)[..., None] * fractions                            # [..., 1, F]
  z = np.exp(-alphas[:, None] * u[..., None, :])                                 # [..., G, n]
  # A' per (alpha, E): sum z (L − E) / sum z², floored positive.
  zl = (z * L[..., None, :]).sum(-1)[..., None]                                   # [..., G, 1]
  zs = z.sum(-1)[..., None]
  zz = (z * z).sum(-1)[..., None]
  A = np.maximum((zl - E * zs) / zz, 1e-12)                                       # [..., G, F]
  theta = np.stack(np.broadcast_arrays(np.log(E), np.log(A), alphas[:, None] + 0 * A), -1)  # [..., G, F, 3]
  theta = theta.reshape(*theta.shape[:-3], -1, 3)                                  # [..., G·F, 3]
  obj = _objective(theta, u[..., None, :], y[..., None, :], HUBER_DELTA)
  best = np.argsort(obj, axis=-1)[..., :k]
  return np.take_along_axis(theta, best[..., None], axis=-2)


def _refine(theta, u, y, delta, steps: int = 30):
  """Levenberg–Marquardt on the Huber objective (IRLS weights), batched over theta [..., 3] with u / y
  [..., n] broadcast against it."""
  lam = np.full(theta.shape[:-1], 1e-3)
  obj = _objective(theta, u, y, delta)
  eye = np.eye(3)
  for _ in range(steps):
    pred = _log_model(theta, u)
    r = y - pred
    w = np.where(np.abs(r) <= delta, 1.0, delta / np.maximum(np.abs(r), 1e-300))
    p = np.exp(theta[..., 0:1] - pred)                                          # d pred / d log E
    q = 1.0 - p                                                                  # d pred / d log A'
    J = np.stack([p, q, -u * q], -1)                                             # [..., n, 3]
    JtW = J.swapaxes(-1, -2) * w[..., None, :]
    H = JtW @ J
    g = (JtW @ r[..., None])[..., 0]
    # A refit that wandered off (inf / nan) takes no step; H is PSD, so the damping below keeps it invertible.
    ok = np.isfinite(H).all((-1, -2)) & np.isfinite(g).all(-1)
    H, g = np.where(ok[..., None, None], H, eye), np.where(ok[..., None], g, 0.0)
    floor = 1e-9 * (np.trace(H, axis1=-2, axis2=-1) / H.shape[-1] + 1.0)  # 1e-9 x the mean diagonal
    H = H + (lam[..., None, None] * np.diagonal(H, axis1=-2, axis2=-1)[..., None] + floor[..., None, None]) * eye
    step = np.linalg.solve(H, g[..., None])[..., 0]
    trial = theta + step
    trial_obj = _objective(trial, u, y, delta)
    better = trial_obj < obj
    theta = np.where(better[..., None], trial, theta)
    obj = np.where(better, trial_obj, obj)
    lam = np.where(better, lam * 0.3, lam * 10.0)
  return theta, obj


def _fit_batch(u, y, delta, theta0):
  """Best (log E, log A', α) [..., 3] of the runs u / y [..., n], refined from each start theta0 [..., k, 3]."""
  theta, obj = _refine(theta0, u[..., None, :], y[..., None, :], delta)
  best = np.argmin(obj, axis=-1)
  return np.take_along_axis(theta, best[..., None, None], axis=-2)[..., 0, :]


@np.errstate(over="ignore", invalid="ignore")  # bootstrap refits may wander to huge exponents; they are kept
def fit_power_law(compute, loss, *, bootstrap: int = 1000, seed: int = 0, huber_delta: float = HUBER_DELTA
                  ) -> PowerLawFit:
  """L(C) = E + A·C^(−α) fitted to the runs (compute [n], loss [n]) with 95% bootstrap intervals.

  `bootstrap` refits on the runs resampled with replacement (seeded by `seed`; 0 = no intervals: ci
  holds (nan, nan)). At least 4 runs, every value positive. C is rescaled by its geometric mean inside
  the fit, so any unit (FLOPs, params) works.
  """
  C, L = _check_runs(compute, loss, "fit_power_law")
  c0 = float(np.exp(np.mean(np.log(C))))
  u, y = np.log(C / c0), np.log(L)

  def unpack(theta):  # (log E, log A', alpha) at C / c0 -> (E, A, alpha) at C
    return np.stack([np.exp(theta[..., 0]), np.exp(theta[..., 1]) * c0 ** theta[..., 2], theta[..., 2]], -1)

  starts = _starts(u, y, 3)                                                      # [3, 3]
  best = _fit_batch(u, y, huber_delta, starts)
  E, A, alpha = unpack(best)
  samples = np.full((0, 3), np.nan)
  ci = {k: (float("nan"), float("nan")) for k in ("E", "A", "alpha")}
  if bootstrap:  # each refit starts from the point fit and the grid's best starts of the whole data
    idx = np.random.default_rng(seed).integers(0, u.size, (bootstrap, u.size))
    theta0 = np.broadcast_to(np.concatenate([best[None], starts]), (bootstrap, 4, 3))
    samples = unpack(_fit_batch(u[idx], y[idx], huber_delta, theta0))
    lo, hi = np.percentile(samples, _PERCENTILES, axis=0)
    ci = {k: (float(lo[i]), float(hi[i])) for i, k in enumerate(("E", "A", "alpha"))}
  residuals = y - np.log(E + A * C ** -alpha)
  return PowerLawFit(float(E), float(A), float(alpha), ci, residuals, samples, (float(C.min()), float(C.max())))


def isoflop_optimum(params, loss) -> tuple[float, float]:
  """(N_opt, L at N_opt) of one compute budget's runs: a parabola in log N fitted to the losses of
  models of `params` sizes [n] (at least 3). A curve without a minimum (not convex) is a ValueError."""
  N, L = _check_runs(params, loss, "isoflop_optimum", min_points=3)
  c2, c1, c0 = np.polyfit(np.log(N), L, 2)
  if not c2 > 0:
    raise ValueError("isoflop_optimum: the losses do not curve upward in log N (no minimum); add sizes on both"
                     " sides of the optimum.")
  x = -c1 / (2 * c2)
  return float(np.exp(x)), float(c0 - c1 * c1 / (4 * c2))


def fit_optimal_size(budgets, n_opt, *, bootstrap: int = 1000, seed: int = 0) -> OptimalSizeFit:
  """N_opt = k·C^a by least squares in log-log over the budgets [n] (at least 3), with a's 95% bootstrap
  interval (budgets resampled with replacement; resamples of one distinct budget are skipped)."""
  C, N = _check_runs(budgets, n_opt, "fit_optimal_size", min_points=3)
  x, y = np.log(C), np.log(N)
  a, b = np.polyfit(x, y, 1)
  ci = (float("nan"), float("nan"))
  if bootstrap:
    idx = np.random.default_rng(seed).integers(0, x.size, (bootstrap, x.size))
    xs, ys = x[idx], y[idx]
    xm, ym = xs.mean(1, keepdims=True), ys.mean(1, keepdims=True)
    var = ((xs - xm) ** 2).sum(1)
    ok = var > 1e-12
    slopes = ((xs - xm) * (ys - ym)).sum(1)[ok] / var[ok]
    ci = tuple(float(v) for v in np.percentile(slopes, _PERCENTILES))
  return OptimalSizeFit(float(a), float(np.exp(b)), ci)


def _first_crossing(la, lb, grid):
  """The first compute on `grid` [G] where la − lb [..., G] changes sign (log-linear interpolation), else nan."""
  d = la - lb
  change = np.signbit(d[..., :-1]) != np.signbit(d[..., 1:])
  has = change.any(-1)
  i = np.argmax(change, axis=-1)
  d0 = np.take_along_axis(d, i[..., None], -1)[..., 0]
  d1 = np.take_along_axis(d, i[..., None] + 1, -1)[..., 0]
  lg = np.log(grid)
  t = d0 / np.where(d0 == d1, 1.0, d0 - d1)
  return np.where(has, np.exp(lg[i] + t * (lg[i + 1] - lg[i])), np.nan)


@np.errstate(over="ignore", invalid="ignore")
def crossover(fit_a: PowerLawFit, fit_b: PowerLawFit, *, span: float = 100.0) -> Crossover | None:
  """Where the fitted curves of two families meet, searched over [smallest compute of either, span x the
  largest] (log grid): the first crossing of the point fits, with a 95% interval over the bootstrap refit
  pairs (i-th refit of each) that cross in that range, and the fraction that do. None: the point fits do
  not cross there ("no crossing in [C_min, span·C_max]")."""
  lo = min(fit_a.compute_range[0], fit_b.compute_range[0])
  hi = span * max(fit_a.compute_range[1], fit_b.compute_range[1])
  grid = np.exp(np.linspace(np.log(lo), np.log(hi), 4001))
  point = float(_first_crossing(fit_a.predict(grid), fit_b.predict(grid), grid))
  if not np.isfinite(point):
    return None
  n = min(len(fit_a.samples), len(fit_b.samples))
  if n == 0:
    return Crossover(point, (float("nan"), float("nan")), float("nan"))

  def curves(s):
    return s[:n, 0:1] + s[:n, 1:2] * grid ** -s[:n, 2:3]

  cross = _first_crossing(curves(fit_a.samples), curves(fit_b.samples), grid)
  found = cross[np.isfinite(cross)]
  ci = tuple(float(v) for v in np.percentile(found, _PERCENTILES)) if found.size else (float("nan"),) * 2
  return Crossover(point, ci, float(found.size / n))
