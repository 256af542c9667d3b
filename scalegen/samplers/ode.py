"""One ODE integrator for every family with a velocity field (flow matching, DDPM's probability-flow ODE).

`integrate(f, state, t0, t1, ...)` solves d state / dt = f(t, state) from t0 to t1 and returns the state
at t1. `state` is a tensor or a tuple of tensors (an augmented state such as (x, log-density change));
`f(t, state)` gets t as a 0-dim tensor and returns a structure like `state`.

Methods: `euler` and `heun` (Heun's second-order method, Karras et al. 2022 Alg. 1 without the
stochastic churn) take `steps` equal steps; `adaptive` is torchdiffeq's Dormand-Prince 5(4) (`dopri5`)
with relative and absolute tolerances `rtol`, `atol`, which is what the likelihood literature reports
(Chen et al. 2018; Grathwohl et al. 2019; Song et al. 2021 use rtol = atol = 1e-5).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import torch
from torch import Tensor
from torchdiffeq import odeint

State = Union[Tensor, tuple[Tensor, ...]]
Field = Callable[[Tensor, State], State]
METHODS = ("euler", "heun", "adaptive")


def _axpy(a: State, h: float | Tensor, b: State) -> State:
    """a + h * b for tensors or tuples of tensors."""
    if isinstance(a, tuple):
        return tuple(ai + h * bi for ai, bi in zip(a, b))
    return a + h * b


def integrate(f: Field, state: State, t0: float, t1: float, *, method: str = "heun", steps: int = 50,
              rtol: float = 1e-5, atol: float = 1e-5) -> State:
    """The solution of d state/dt = f(t, state) at t1, starting from `state` at t0 (t1 < t0 allowed)."""
    if method not in METHODS:
        raise ValueError(f"ODE method {method!r}; one of {', '.join(METHODS)}")
    ref = state[0] if isinstance(state, tuple) else state
    if method == "adaptive":
        ts = torch.tensor([t0, t1], dtype=torch.float64 if ref.dtype == torch.float64 else torch.float32,
                          device=ref.device)
        out = odeint(f, state, ts, rtol=rtol, atol=atol, method="dopri5")
        return tuple(o[-1] for o in out) if isinstance(state, tuple) else out[-1]
    if steps < 1:
        raise ValueError(f"ODE steps must be >= 1, got {steps}")
    grid = torch.linspace(t0, t1, steps + 1, dtype=torch.float64).tolist()  # host floats: no device reads
    for a, b in zip(grid[:-1], grid[1:]):
        h = b - a
        ta = torch.tensor(a, dtype=ref.dtype, device=ref.device)
        da = f(ta, state)
        if method == "euler":
            state = _axpy(state, h, da)
            continue
        guess = _axpy(state, h, da)
        db = f(torch.tensor(b, dtype=ref.dtype, device=ref.device), guess)
        mean = tuple(0.5 * (x + y) for x, y in zip(da, db)) if isinstance(da, tuple) else 0.5 * (da + db)
        state = _axpy(state, h, mean)
    return state
