"""An independent NumPy transcription of the AdamW update, for comparisons.

Everything runs in float64 NumPy, one step at a time, exactly as the formulas read. For each
leaf ``w`` with gradient ``g`` at step ``t = 1, 2, ...`` (hyperparameters that are schedules
are evaluated at ``t - 1``, the step count before the update)::

    g   = g + l2 * w                      (only on leaves the mask decays; l2 = 0 by default)
    m   = b1 * m + (1 - b1) * g           v = b2 * v + (1 - b2) * g**2
    c1  = 1 - b1**t                       c2 = 1 - b2**t      (both 1 without bias correction)
    v̂   = v / c2                          (AMSGrad: v̂ = v_max = max(v_max, v / c2))
    m̂   = m / c1                          (Nesterov: b1 * m / (1 - b1**(t+1)) + (1 - b1) * g / c1)
    u   = m̂ / (sqrt(v̂ + eps_root) + eps)
    u   = keep * u / max(mean(keep), 1e-3),  keep = sign(u) * sign(g) > 0   (cautious only)
    x   = w - w_ref                       (w_ref: 0, the initial params, or a given dict)
    c   = sign(u) * sign(x) >= 0          (cautious_weight_decay only; else c = 1)
    w   = w - lr * u - d * c * x

with the decay ``d`` by ``decay_coupling``: ``lr * weight_decay`` ("lr"),
``(lr / peak_learning_rate) * weight_decay`` ("schedule"; ``weight_decay`` when no peak is
given), ``weight_decay`` ("none"), ``lr**2 / peak_learning_rate * weight_decay`` ("adamc";
``lr * weight_decay`` when no peak is given); ``d = 0`` on leaves the mask leaves out. This is the
update of the README's "The update" section.

:func:`algoperf_nadamw_trajectory` transcribes the NAdamW baseline of MLCommons AlgoPerf
(its weight decay and warmup-cosine schedule included), independently of the above.

:func:`skip_spikes_trajectory` transcribes ``adamw_jax.skip_spikes``' decisions on a
sequence of metrics.
"""

from __future__ import annotations

import numpy as np


def value(hp, step: int) -> float:
    """A hyperparameter at ``step`` (0-based): a number, or a schedule evaluated there."""
    return float(hp(np.int32(step))) if callable(hp) else float(hp)


def adamw_trajectory(
    params: dict,
    grad_fn,
    steps: int,
    *,
    learning_rate=1e-3,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_root=0.0,
    weight_decay=1e-2,
    decay_coupling="lr",
    peak_learning_rate=None,
    mask=None,
    amsgrad=False,
    nesterov=False,
    bias_correction=True,
    l2=0.0,
    cautious=False,
    cautious_weight_decay=False,
    decay_target="zero",
) -> dict:
    """Runs ``steps`` updates; ``grad_fn(params, t)`` gives the gradient dict at step t."""
    w = {k: np.array(v, np.float64) for k, v in params.items()}
    if decay_target == "zero":
        ref = {k: np.zeros_like(x) for k, x in w.items()}
    elif decay_target == "init":
        ref = {k: x.copy() for k, x in w.items()}
    else:
        ref = {k: np.array(decay_target[k], np.float64) for k in w}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v = {k: np.zeros_like(x) for k, x in w.items()}
    vmax = {k: np.zeros_like(x) for k, x in w.items()}
    for t in range(1, steps + 1):
        g = {k: np.array(x, np.float64) for k, x in grad_fn(w, t).items()}
        lr = value(learning_rate, t - 1)
        wd = value(weight_decay, t - 1)
        reg = value(l2, t - 1)
        new_w = {}
        for k in w:
            decays = True if mask is None else mask[k]
            gk = g[k] + (reg * w[k] if decays else 0.0)
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk * gk
            c1 = 1 - b1**t if bias_correction else 1.0
            c2 = 1 - b2**t if bias_correction else 1.0
            v_hat = v[k] / c2
            if amsgrad:
                vmax[k] = np.maximum(vmax[k], v_hat)
                v_hat = vmax[k]
            if nesterov:
                c1_next = 1 - b1 ** (t + 1) if bias_correction else 1.0
                m_hat = b1 * m[k] / c1_next + (1 - b1) * gk / c1
            else:
                m_hat = m[k] / c1
            u = m_hat / (np.sqrt(v_hat + eps_root) + eps)
            if cautious:
                keep = np.sign(u) * np.sign(gk) > 0
                u = np.where(keep, u / max(np.mean(keep), 1e-3), 0.0)
            if decay_coupling == "lr":
                d = lr * wd
            elif decay_coupling == "schedule":
                d = wd if peak_learning_rate is None else (lr / peak_learning_rate) * wd
            elif decay_coupling == "adamc":
                d = lr * wd if peak_learning_rate is None else lr**2 / peak_learning_rate * wd
            else:
                d = wd
            if not decays:
                d = 0.0
            x = w[k] - ref[k]
            c = np.sign(u) * np.sign(x) >= 0 if cautious_weight_decay else 1.0
            new_w[k] = w[k] - lr * u - d * c * x
        w = new_w
    return w


# The five points of AlgoPerf's external-tuning search space for its NAdamW baseline
# (algorithms/baselines/external_tuning/tuning_search_space.json), the optimizer's fields.
ALGOPERF_SEARCH_SPACE = (
    {
        "learning_rate": 0.001308209823469072,
        "one_minus_beta1": 0.02686663061,
        "beta2": 0.9981232922116359,
        "weight_decay": 0.16375311233774334,
        "warmup_factor": 0.1,
    },
    {
        "learning_rate": 0.0008445074561975979,
        "one_minus_beta1": 0.11042418465,
        "beta2": 0.9978504782314613,
        "weight_decay": 0.08135402759553023,
        "warmup_factor": 0.05,
    },
    {
        "learning_rate": 0.004958460849689891,
        "one_minus_beta1": 0.13625575743,
        "beta2": 0.6291854735396584,
        "weight_decay": 0.1147386261512052,
        "warmup_factor": 0.02,
    },
    {
        "learning_rate": 0.0017486387539278373,
        "one_minus_beta1": 0.06733926164,
        "beta2": 0.9955159689799007,
        "weight_decay": 0.08121616522670176,
        "warmup_factor": 0.02,
    },
)


def algoperf_learning_rate(step: int, *, learning_rate, warmup_factor, step_hint) -> float:
    """AlgoPerf's NAdamW learning rate at ``step`` (0-based): linear warmup, then cosine.

    With ``W = int(warmup_factor * step_hint)`` warmup steps and ``C = max(step_hint - W, 1)``
    cosine steps::

        lr(s) = learning_rate * s / W                                  s < W
        lr(s) = learning_rate * (1 + cos(pi * min(s - W, C) / C)) / 2  s >= W

    so the first step (s = 0) has learning rate 0 unless W = 0.
    """
    warmup = int(warmup_factor * step_hint)
    cosine = max(step_hint - warmup, 1)
    if step < warmup:
        return learning_rate * step / warmup
    return learning_rate * 0.5 * (1 + np.cos(np.pi * min(step - warmup, cosine) / cosine))


def algoperf_nadamw_trajectory(
    params: dict, grad_fn, steps: int, *, hyperparameters: dict, step_hint: int, eps=1e-8
) -> dict:
    """AlgoPerf's NAdamW baseline for ``steps`` steps, in float64 NumPy.

    ``hyperparameters`` is one point of :data:`ALGOPERF_SEARCH_SPACE`. Per leaf, at step
    ``t = 1, 2, ...`` with ``b1 = 1 - one_minus_beta1``, ``b2 = beta2``,
    ``lr = algoperf_learning_rate(t - 1)``, ``wd = weight_decay``::

        m = b1 * m + (1 - b1) * g               v = b2 * v + (1 - b2) * g**2
        m̂ = (b1 * m + (1 - b1) * g) / (1 - b1**t)      (one more moment update, corrected once)
        v̂ = v / (1 - b2**t)
        w = w - lr * (m̂ / (sqrt(v̂) + eps) + wd * w)   (decay on every leaf, times lr)
    """
    b1 = 1 - hyperparameters["one_minus_beta1"]
    b2 = hyperparameters["beta2"]
    wd = hyperparameters["weight_decay"]
    w = {k: np.array(x, np.float64) for k, x in params.items()}
    m = {k: np.zeros_like(x) for k, x in w.items()}
    v = {k: np.zeros_like(x) for k, x in w.items()}
    for t in range(1, steps + 1):
        g = {k: np.array(x, np.float64) for k, x in grad_fn(w, t).items()}
        lr = algoperf_learning_rate(
            t - 1,
            learning_rate=hyperparameters["learning_rate"],
            warmup_factor=hyperparameters["warmup_factor"],
            step_hint=step_hint,
        )
        for k in w:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            m_hat = (b1 * m[k] + (1 - b1) * g[k]) / (1 - b1**t)
            v_hat = v[k] / (1 - b2**t)
            w[k] = w[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * w[k])
    return w


def skip_spikes_trajectory(metrics, *, threshold=6.0, window=100, warmup=20):
    """``adamw_jax.skip_spikes``' decisions on a sequence of metrics, in float64.

    For each metric ``x``, with ``n`` accepted steps so far and their running ``mean`` and
    ``var``::

        z     = (x - mean) / max(sqrt(var), 1e-6 * |mean|, tiny)   (0 while n = 0, x finite)
        skip  = x not finite  or  (n >= warmup and z > threshold)
        if not skip:  a = 1 / min(n + 1, window);  d = x - mean
                      mean += a * d;  var = (1 - a) * (var + a * d**2);  n += 1

    Returns:
      ``(skips, zs, mean, var)``: per step whether it was skipped and its z-score, and the
      final statistics.
    """
    mean = var = 0.0
    n = 0
    skips, zs = [], []
    tiny = np.finfo(np.float64).tiny
    for x in np.asarray(metrics, np.float64):
        with np.errstate(invalid="ignore", over="ignore"):
            scale = max(np.sqrt(var), 1e-6 * abs(mean), tiny)
            z = 0.0 if n == 0 and np.isfinite(x) else (x - mean) / scale
        skip = not np.isfinite(x) or (n >= warmup and z > threshold)
        if not skip:
            a = 1.0 / min(n + 1, window)
            d = x - mean
            mean, var, n = mean + a * d, (1 - a) * (var + a * d * d), n + 1
        skips.append(skip)
        zs.append(z)
    return np.array(skips), np.array(zs), mean, var


def rel_err(a, b) -> float:
    """Norm-wise relative error: max |a - b| over max |b| (the leaf's scale)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def max_rel_err(tree_a: dict, tree_b: dict) -> float:
    """The worst :func:`rel_err` over the leaves of two dicts with the same keys."""
    return max(rel_err(tree_a[k], tree_b[k]) for k in tree_b)


def norm_rel_err(tree_a: dict, tree_b: dict) -> float:
    """Relative error in the trees' norm: ``||a - b|| / ||b||`` over all leaves together."""
    diff = sum(np.sum(np.abs(np.asarray(tree_a[k], np.float64) - tree_b[k]) ** 2) for k in tree_b)
    norm = sum(np.sum(np.abs(np.asarray(tree_b[k], np.float64)) ** 2) for k in tree_b)
    return float(np.sqrt(diff / max(norm, 1e-300)))
