"""Orthogonal matrices for rotations: Hadamard constructions of any order that has
one here, and random orthogonal blocks otherwise.

A Hadamard matrix `H` of order n has entries +-1 and `H H^T = n I`, so
`H / sqrt(n)` is orthogonal and spreads every coordinate over all n outputs
with equal weight: the property that makes rotated weights and activations
free of outlier channels (QuaRot, arXiv:2404.00456). Orders here:

* powers of two (Sylvester's Walsh-Hadamard recursion);
* Paley's first construction, order `q + 1` for a prime `q = 3 (mod 4)`
  (12, 20, 24, 32, 44, 48, 60, 68, 72, ...);
* Paley's second construction, order `2 (q + 1)` for a prime `q = 1 (mod 4)`
  (12, 28, 36, 60, 76, ...);
* Kronecker products `H_m (x) H_{2^k}` of one of those with a Walsh-Hadamard,
  which covers the widths of small models: 576 = 36 x 16 (SmolLM2),
  640 = 20 x 32 (Gemma 3 270M), 1536 = 12 x 128, 896 = 28 x 32.

A width with no such factorization (an odd width, or 10 x 2^k, 18 x 2^k...)
gets, with `kind="auto"`, the Kronecker product of a random orthogonal block
of the odd part with a Walsh-Hadamard; with `kind="hadamard"` it is an error
naming the width.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["hadamard", "hadamard_order_factor", "orthogonal", "random_orthogonal",
           "ROTATION_KINDS"]

ROTATION_KINDS = ("hadamard", "random", "auto")


def _is_prime(q: int) -> bool:
  if q < 2:
    return False
  i = 2
  while i * i <= q:
    if q % i == 0:
      return False
    i += 1
  return True


def _jacobsthal(q: int) -> np.ndarray:
  """`Q[i, j] = chi(j - i)`, chi the quadratic character mod the prime `q`."""
  squares = np.zeros(q, bool)
  squares[(np.arange(1, q) ** 2) % q] = True
  chi = np.where(squares, 1, -1).astype(np.int64)
  chi[0] = 0
  idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
  return chi[idx]


def _paley1(q: int) -> np.ndarray:
  """Order `q + 1`, `q` prime with `q = 3 (mod 4)`: `I + S`, S the skew conference matrix."""
  n = q + 1
  s = np.zeros((n, n), np.int64)
  s[0, 1:] = 1
  s[1:, 0] = -1
  s[1:, 1:] = _jacobsthal(q)
  return s + np.eye(n, dtype=np.int64)


def _paley2(q: int) -> np.ndarray:
  """Order `2 (q + 1)`, `q` prime with `q = 1 (mod 4)`, from the symmetric conference matrix."""
  n = q + 1
  c = np.zeros((n, n), np.int64)
  c[0, 1:] = 1
  c[1:, 0] = 1
  c[1:, 1:] = _jacobsthal(q)
  zero = np.array([[1, -1], [-1, -1]], np.int64)
  one = np.array([[1, 1], [1, -1]], np.int64)
  return np.where(c[:, None, :, None] == 0, zero[None, :, None, :],
                  c[:, None, :, None] * one[None, :, None, :]).reshape(2 * n, 2 * n)


def _small_order(m: int) -> str | None:
  """How a Hadamard matrix of order `m` is built here, or None."""
  if m in (1, 2):
    return "sylvester"
  if m % 4:
    return None
  if _is_prime(m - 1) and (m - 1) % 4 == 3:
    return "paley1"
  if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
    return "paley2"
  return None


def hadamard_order_factor(n: int) -> tuple[int, int] | None:
  """`(m, 2^k)` with `n = m * 2^k` and a Hadamard matrix of order `m` built here
  (the smallest such `m`), or None when `n` has no Hadamard construction here."""
  if n < 1:
    return None
  p = 1
  while n % (2 * p) == 0:
    p *= 2
  # The smallest base order first: the Walsh-Hadamard part is the cheapest to apply.
  while p >= 1:
    m = n // p
    if _small_order(m) is not None:
      return m, p
    p //= 2
  return None


def _sylvester(n: int) -> np.ndarray:
  h = np.ones((1, 1), np.int64)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


@functools.lru_cache(maxsize=32)
def _hadamard_cached(n: int) -> np.ndarray:
  factor = hadamard_order_factor(n)
  if factor is None:
    raise ValueError(f"no Hadamard matrix of order {n} is built here: {n} is not m * 2^k "
                     "for m in {1, 2} or a Paley order (q + 1 with a prime q = 3 mod 4, "
                     "2 (q + 1) with a prime q = 1 mod 4); use kind='random' or 'auto'")
  m, p = factor
  how = _small_order(m)
  base = (_sylvester(m) if how == "sylvester" else
          _paley1(m - 1) if how == "paley1" else _paley2(m // 2 - 1))
  h = np.kron(base, _sylvester(p))
  h.setflags(write=False)
  return h


def hadamard(n: int) -> np.ndarray:
  """A Hadamard matrix of order `n` (int64 entries +-1, `H H^T = n I`); a clear
  error for an order with no construction here."""
  return _hadamard_cached(int(n)).copy()


def random_orthogonal(n: int, seed: int = 0) -> np.ndarray:
  """A Haar-random orthogonal `[n, n]` (float64): QR of a Gaussian, signs fixed."""
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((n, n))
  q, r = np.linalg.qr(a)
  return q * np.sign(np.diag(r))[None, :]


def orthogonal(n: int, kind: str = "hadamard", seed: int = 0, *, what: str = "") -> np.ndarray:
  """An orthogonal `[n, n]` float64 matrix.

  kind:
    "hadamard": a randomized Hadamard `diag(signs) H / sqrt(n)` (random +-1
      signs from `seed`); an error naming `what` and `n` when no Hadamard of
      order `n` is built here.
    "random": Haar-random orthogonal.
    "auto": the randomized Hadamard where it exists, else the Kronecker
      product of a random orthogonal block of the odd part of `n` with a
      Walsh-Hadamard of its power-of-two part (signs randomized).
  """
  n = int(n)
  if n < 1:
    raise ValueError(f"{what or 'rotation'}: width must be positive, got {n}")
  if kind not in ROTATION_KINDS:
    raise ValueError(f"unknown rotation kind {kind!r}; expected one of {ROTATION_KINDS}")
  rng = np.random.default_rng(seed)
  if kind == "random":
    return random_orthogonal(n, seed)
  if hadamard_order_factor(n) is not None:
    h = _hadamard_cached(n).astype(np.float64) / np.sqrt(n)
  elif kind == "hadamard":
    raise ValueError(f"{what or 'rotation'}: no Hadamard matrix of width {n} is built here "
                     f"(widths m * 2^k with m = 1, 2 or a Paley order); use rotation kind "
                     "'auto' (random orthogonal block x Walsh-Hadamard) or 'random'")
  else:
    p = 1
    while n % (2 * p) == 0:
      p *= 2
    h = np.kron(random_orthogonal(n // p, seed + 1), _sylvester(p).astype(np.float64)
                / np.sqrt(p))
  signs = rng.choice(np.array([-1.0, 1.0]), size=n)
  return signs[:, None] * h
