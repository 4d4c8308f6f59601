"""Scaling-law fits (`efficient_attn.scaling`) against data drawn from known laws.

Chinchilla's published parameter term (E = 1.69, A = 406.4, α = 0.34; Hoffmann et al. 2022) over
1e7-1e9 of its variable: α is recovered within ±0.02 at 0.5% noise, the 95% bootstrap intervals cover
the truth in at least 90 of 100 seeded replicates at 1% noise, the crossover of two known curves lies
in its interval, and the IsoFLOP helpers find known optima.
"""

import numpy as np
import pytest

from efficient_attn import scaling

E, A, ALPHA = 1.69, 406.4, 0.34


def _runs(n, sigma, seed, E=E, A=A, alpha=ALPHA):
  C = np.exp(np.linspace(np.log(1e7), np.log(1e9), n))
  return C, (E + A * C ** -alpha) * np.exp(np.random.default_rng(seed).normal(0, sigma, n))


def test_alpha_is_recovered_within_two_hundredths():
  errors = [scaling.fit_power_law(*_runs(40, 0.005, seed), bootstrap=0).alpha - ALPHA for seed in range(20)]
  assert sum(abs(e) <= 0.02 for e in errors) >= 18, np.round(errors, 3)
  fit = scaling.fit_power_law(*_runs(40, 0.0, 0), bootstrap=0)  # noiseless: the law itself
  assert fit.alpha == pytest.approx(ALPHA, abs=1e-4) and fit.E == pytest.approx(E, rel=1e-4)
  assert fit.predict(1e8) == pytest.approx(E + A * 1e8 ** -ALPHA, rel=1e-5)
  assert np.max(np.abs(fit.residuals)) < 1e-6


def test_bootstrap_intervals_cover_the_truth():
  covered = {"E": 0, "A": 0, "alpha": 0}
  for seed in range(100):
    fit = scaling.fit_power_law(*_runs(30, 0.01, 100 + seed), bootstrap=200, seed=seed)
    for name, truth in (("E", E), ("A", A), ("alpha", ALPHA)):
      low, high = fit.ci[name]
      covered[name] += low <= truth <= high
  assert min(covered.values()) >= 90, covered


def test_crossover_of_two_known_curves_lies_in_its_interval():
  # a: a higher floor, b: a larger A; they meet where 0.5 = 300·C^-0.3, C = 600^(1/0.3), past the runs
  truth = 600 ** (1 / 0.3)
  a = scaling.fit_power_law(*_runs(30, 0.005, 1, E=2.0, A=100.0, alpha=0.3), bootstrap=300, seed=1)
  b = scaling.fit_power_law(*_runs(30, 0.005, 2, E=1.5, A=400.0, alpha=0.3), bootstrap=300, seed=2)
  cross = scaling.crossover(a, b)
  assert cross is not None and cross.ci[0] <= truth <= cross.ci[1], (cross, truth)
  assert truth / 2 < cross.compute < truth * 2 and cross.fraction > 0.5
  lower = scaling.fit_power_law(*_runs(30, 0.0, 3, E=1.5, A=100.0, alpha=0.3), bootstrap=0)
  assert scaling.crossover(a, lower) is None  # 0.5 below everywhere: no crossing in range


def test_isoflop_optimum_and_optimal_size():
  N = np.exp(np.linspace(np.log(1e6), np.log(1e9), 7))
  n_opt, l_opt = scaling.isoflop_optimum(N, 2.0 + 0.05 * (np.log(N) - np.log(3e7)) ** 2)
  assert n_opt == pytest.approx(3e7, rel=1e-6) and l_opt == pytest.approx(2.0)
  with pytest.raises(ValueError, match="no minimum"):
    scaling.isoflop_optimum(N, 5.0 - 0.005 * (np.log(N) - 16.0) ** 2)
  C = np.exp(np.linspace(np.log(1e15), np.log(1e19), 6))
  size = scaling.fit_optimal_size(C, 0.1 * C ** 0.5 * np.exp(np.random.default_rng(0).normal(0, 0.05, 6)))
  assert size.exponent == pytest.approx(0.5, abs=0.02) and size.ci[0] <= 0.5 <= size.ci[1]
  assert size.predict(1e17) == pytest.approx(size.coefficient * 1e17 ** size.exponent)


@pytest.mark.parametrize("args, match", [(([1, 2, 3, 4], [1, 2, 3]), "4 x values and 3 losses"),
                                         (([1, 2, 3], [1, 2, 3]), "3 runs are too few"),
                                         (([1, 2, 3, -4], [1, 2, 3, 4]), "finite positive")])
def test_bad_runs_are_one_sentence(args, match):
  with pytest.raises(ValueError, match=match) as e:
    scaling.fit_power_law(*args)
  assert str(e.value).count(". ") == 0
