"""Ports of PyTorch's and Keras' AdamW that follow those frameworks' arithmetic step by step.

:func:`adamw_jax.adamw` computes the same mathematical update as ``torch.optim.AdamW`` and
``keras.optimizers.AdamW`` (up to where ``eps`` sits), but in a different order of floating
point operations, so long runs drift apart at the level of rounding errors. The
transformations here redo each framework's operations in its order and precision, so a run
ported from PyTorch or Keras can be checked against the original step for step.

Both compute the framework's new parameters inside ``update`` and return
``new_params - params``, so ``optax.apply_updates`` lands on the framework's parameters up to
one rounding of that sum (exactly, whenever the step is smaller than the parameter, which is
the usual case: the subtraction is then exact by Sterbenz' lemma).
"""

import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamw_jax import _numerics, _trees, _validate
from adamw_jax._base import ScalarOrSchedule
from adamw_jax.masks import leaf_path, named_leaves

__all__ = [
    "KerasAdamWState",
    "TorchAdamWState",
    "keras_adamw",
    "torch_adamw",
]


class TorchAdamWState(NamedTuple):
    """State of :func:`torch_adamw`, field for field PyTorch's per-parameter state.

    Attributes:
      count: steps taken (PyTorch's ``step``), int32, saturating at ``2**31 - 1``.
      mu: first moment (PyTorch's ``exp_avg``), like the params.
      nu: second moment (``exp_avg_sq``), like the params; for a complex parameter its real
        and imaginary parts hold the moments of the gradient's real and imaginary parts, as
        PyTorch keeps them.
      nu_max: running maximum of the raw second moment (``max_exp_avg_sq``) when
        ``amsgrad``, otherwise ``optax.EmptyState()``.
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates


class KerasAdamWState(NamedTuple):
    """State of :func:`keras_adamw`, field for field Keras' optimizer variables.

    Attributes:
      count: Keras' ``iterations``, int32, saturating at ``2**31 - 1``.
      mu: Keras' ``momentum`` slots, like the params.
      nu: Keras' ``velocity`` slots, like the params.
      nu_max: Keras' ``velocity_hat`` slots (running maximum of the raw velocity) when
        ``amsgrad``, otherwise ``optax.EmptyState()``.
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates


def _scalar_dtype() -> jnp.dtype:
    """The widest float JAX allows now: hyperparameters are combined in it, as in Python."""
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)


def _one_minus(beta: Any, dtype: jnp.dtype) -> jax.Array:
    """``1 - beta``, in Python's double precision when ``beta`` is a number."""
    if isinstance(beta, (int, float, np.number)):
        return jnp.asarray(1.0 - float(beta), dtype)
    return 1 - jnp.asarray(beta, dtype)


def _check_update_inputs(name: str, updates: Any, params: Any) -> None:
    """Refuses a ported step without updates, without params, or with mismatched trees."""
    _validate.check_update_call(name, updates, params)
    _validate.check_inexact_leaves("updates", updates)


def _zero_state(state_cls: type, params: Any, amsgrad: bool) -> Any:
    """A fresh ported state of class ``state_cls``: count 0 and zero moments like the params."""

    def zeros():
        return jax.tree.map(jnp.zeros_like, params)

    nu_max = zeros() if amsgrad else optax.EmptyState()
    return state_cls(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros(), nu_max=nu_max)


def _map_leaves(
    leaf_step: Callable, updates: Any, params: Any, state: Any, amsgrad: bool, *per_leaf: list
) -> tuple[Any, Any, Any, Any]:
    """``leaf_step(grad, param, mu, nu, nu_max, *extras)`` on every leaf, back as trees.

    ``nu_max`` is None without ``amsgrad``; ``per_leaf`` are further lists, one entry per
    leaf, passed as ``extras``. ``leaf_step`` returns (update, mu, nu, nu_max); the result
    is those four trees, the last being ``state.nu_max`` unchanged without ``amsgrad``.
    """
    treedef = jax.tree.structure(params)
    maxes = jax.tree.leaves(state.nu_max) if amsgrad else [None] * treedef.num_leaves
    columns = (
        jax.tree.leaves(updates),
        jax.tree.leaves(params),
        jax.tree.leaves(state.mu),
        jax.tree.leaves(state.nu),
        maxes,
        *per_leaf,
    )
    rows = [leaf_step(*args) for args in zip(*columns, strict=True)]
    if not amsgrad:
        return (*_trees.unzip(treedef, rows, 3), state.nu_max)
    return tuple(_trees.unzip(treedef, rows, 4))


# PyTorch.


class _TorchScalars(NamedTuple):
    """The scalars of one :func:`torch_adamw` step, in the scalar dtype (``_scalar_dtype``)."""

    decay_factor: jax.Array  # 1 - lr * weight_decay
    step_size: jax.Array  # lr / (1 - beta1**t)
    bias_correction2_sqrt: jax.Array  # sqrt(1 - beta2**t)
    one_minus_b1: jax.Array
    beta2: jax.Array
    one_minus_b2: jax.Array
    eps: jax.Array
    zero: jax.Array  # int32: 0 at run time, unknown at compile time (see _opaque)


def _check_betas(betas: Any) -> tuple[Any, Any]:
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), each in [0, 1); got {betas!r}.")
    _validate.check_scalar("betas[0]", betas[0], low=0.0, high=1.0)
    _validate.check_scalar("betas[1]", betas[1], low=0.0, high=1.0)
    return betas[0], betas[1]


def _bias_correction(beta: Any, t: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """``1 - beta**t``, as ``-expm1(t * log(beta))`` to keep its relative accuracy."""
    if isinstance(beta, (int, float, np.number)):
        log_beta = jnp.asarray(math.log(beta) if beta > 0 else -math.inf, dtype)
    else:
        log_beta = jnp.log(jnp.asarray(beta, dtype))
    return -jnp.expm1(t.astype(dtype) * log_beta)


def _torch_scalars(
    taken: jax.Array, t: jax.Array, lr: Any, weight_decay: Any, beta1: Any, beta2: Any, eps: Any
) -> _TorchScalars:
    """The scalars of step ``t``, ``taken`` (= ``t - 1`` unless saturated) steps being done."""
    s = _scalar_dtype()
    eta = jnp.asarray(_numerics.value_at(lr, taken), s)
    return _TorchScalars(
        decay_factor=1 - eta * jnp.asarray(weight_decay, s),
        step_size=eta / _bias_correction(beta1, t, s),
        bias_correction2_sqrt=jnp.sqrt(_bias_correction(beta2, t, s)),
        one_minus_b1=_one_minus(beta1, s),
        beta2=jnp.asarray(beta2, s),
        one_minus_b2=_one_minus(beta2, s),
        eps=jnp.asarray(eps, s),
        zero=(taken < 0).astype(jnp.int32),
    )


def _elementwise_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32 for 16-bit params (PyTorch's CPU opmath type), else the params' own dtype."""
    dtype = jnp.dtype(dtype)
    return dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


def _as_real(x: jax.Array) -> jax.Array:
    """A complex array as real pairs on a trailing axis (PyTorch's ``view_as_real``)."""
    if jnp.iscomplexobj(x):
        return jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    return x


def _from_real(x: jax.Array, like: jax.Array) -> jax.Array:
    if jnp.iscomplexobj(like):
        return jax.lax.complex(x[..., 0], x[..., 1]).astype(like.dtype)
    return x.astype(like.dtype)


def _opaque(x: jax.Array, zero: jax.Array) -> jax.Array:
    """``x`` unchanged, but hidden from XLA's floating point rewrites.

    XLA fuses a multiply into a following add (one rounding, FMA) and turns a division by a
    broadcast scalar into a multiplication by its reciprocal; PyTorch's separate kernels do
    neither. XOR-ing the bits with ``zero`` (an int32 that is 0 at run time but unknown at
    compile time) keeps ``x`` rounded as computed and makes it a plain array.
    """
    int_dtype = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[jnp.dtype(x.dtype).itemsize]
    bits = jax.lax.bitcast_convert_type(x, int_dtype)
    return jax.lax.bitcast_convert_type(bits ^ zero.astype(int_dtype), x.dtype)


def _torch_lerp(start: jax.Array, end: jax.Array, weight: jax.Array, beta: Any) -> jax.Array:
    """``torch.lerp(start, end, weight)``, ``weight`` being ``1 - beta``.

    ``start + weight * (end - start)`` for ``weight < 0.5``, else
    ``end - (end - start) * (1 - weight)``; for a number ``beta`` the formula is chosen by
    Python's ``1 - beta``, as PyTorch chooses it.
    """
    small = start + weight * (end - start)
    large = end - (end - start) * (1 - weight)
    if _is_number(beta):
        return small if 1.0 - float(beta) < 0.5 else large
    return jnp.where(weight < 0.5, small, large)


def _torch_leaf_step(
    g: jax.Array,
    p: jax.Array,
    m: jax.Array,
    v: jax.Array,
    v_max: jax.Array | None,
    *,
    scalars: _TorchScalars,
    beta1: Any,
    maximize: bool,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """One parameter's PyTorch step: (update, mu, nu, nu_max), nu_max None without AMSGrad.

    Computed on real views (``view_as_real``) in PyTorch's opmath dtype, each kernel's
    result rounded to the params' dtype as PyTorch writes it.
    """
    store = jnp.finfo(p.dtype).dtype
    c = _elementwise_dtype(store)

    def kernel(x):
        """Rounds to the params' dtype, as each PyTorch kernel writes its result."""
        return x if store == c else x.astype(store).astype(c)

    gr, pr = _as_real(g).astype(c), _as_real(p).astype(c)
    mr, vr = _as_real(m).astype(c), _as_real(v).astype(c)
    if maximize:
        gr = -gr
    # The decayed weights, rounded before the add (no fused multiply-add).
    new_p = kernel(_opaque(pr * scalars.decay_factor.astype(c), scalars.zero))
    new_m = kernel(_torch_lerp(mr, gr, scalars.one_minus_b1.astype(c), beta1))
    new_v = kernel(vr * scalars.beta2.astype(c))
    new_v = kernel((scalars.one_minus_b2.astype(c) * gr) * gr + new_v)
    new_max = None if v_max is None else jnp.maximum(_as_real(v_max).astype(c), new_v)
    second = new_v if new_max is None else new_max
    # A true division (XLA would multiply by the reciprocal of a broadcast scalar).
    divisor = _opaque(
        jnp.broadcast_to(scalars.bias_correction2_sqrt.astype(c), second.shape), scalars.zero
    )
    denom = kernel(kernel(jnp.sqrt(second)) / divisor)
    denom = kernel(denom + scalars.eps.astype(c))
    new_p = kernel(new_p + ((-scalars.step_size).astype(c) * new_m) / denom)
    return (
        _from_real(new_p, p) - p,
        _from_real(new_m, m),
        _from_real(new_v, v),
        None if new_max is None else _from_real(new_max, v_max),
    )


def torch_adamw(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""``torch.optim.AdamW`` with PyTorch's defaults and its order of operations.

    At step :math:`t = 1, 2, \dots` with learning rate :math:`\eta_t` (``lr``, or
    ``lr(t - 1)`` for a schedule: a PyTorch LR scheduler stepped once per iteration), for
    each parameter :math:`w` and gradient :math:`g` (negated when ``maximize``):

    .. math::

      w &\leftarrow w \cdot (1 - \eta_t \lambda) \\
      m &\leftarrow m + (1 - \beta_1)(g - m), \qquad
      v \leftarrow \beta_2 v + (1 - \beta_2)\, g \cdot g \\
      \hat v &= \max(\hat v_{t-1}, v) \text{ with AMSGrad, else } v \\
      w &\leftarrow w + \frac{-\eta_t / (1 - \beta_1^t)\; m}
                          {\sqrt{\hat v} / \sqrt{1 - \beta_2^t} + \epsilon}

    exactly as PyTorch's single-tensor implementation groups them: the decay multiplies the
    weights before the Adam step, :math:`\epsilon` is added after dividing
    :math:`\sqrt{v}` by :math:`\sqrt{1 - \beta_2^t}`, and AMSGrad keeps the maximum of the
    raw second moment and bias-corrects it afterwards. Scalars are combined in float64 when
    ``jax_enable_x64`` is on (as PyTorch does in Python) and in float32 otherwise;
    :math:`1 - \beta^t` is computed as :math:`-\mathrm{expm1}(t \log\beta)`, which stays
    accurate in float32. Complex parameters are handled as PyTorch's ``view_as_real``: real
    and imaginary parts are separate coordinates.

    The elementwise steps are kept rounded as PyTorch's separate CPU kernels round them (no
    fused multiply-add into the decayed weight, a true division by
    :math:`\sqrt{1 - \beta_2^t}`). After 1000 float64 steps the parameters agree with
    PyTorch's to a few units in the last place (about ``4e-16`` relative); in float32 to
    about ``3e-7``, the rest being PyTorch's vectorized float32 square root, which is not
    always correctly rounded. 16-bit params are computed in float32 and rounded to their
    dtype after each step PyTorch runs as a separate kernel (so, as in PyTorch, a decay
    below bfloat16's resolution is lost); measured bitwise equal in bfloat16.

    Args:
      lr: :math:`\eta`, in [0, inf): a number, a scalar array or an optax schedule
        ``step -> lr`` evaluated at the 0-based step.
      betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
      eps: :math:`\epsilon`, in [0, inf).
      weight_decay: :math:`\lambda`, in [0, inf). Applied to every leaf, as PyTorch applies
        it to every tensor of a parameter group; use ``optax.masked`` or two groups via
        ``optax.multi_transform`` for PyTorch's per-group settings.
      amsgrad: use the running maximum of the second moment (PyTorch's ``amsgrad``).
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`TorchAdamWState`; its
      ``update`` requires ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from adamw_jax import compat
      >>> tx = compat.torch_adamw(lr=0.1, weight_decay=0.5)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([0.5, 0.5])}, state, params)
      >>> new = optax.apply_updates(params, updates)["w"]  # w * (1 - 0.05) - 0.1 * sign(g)
      >>> [round(float(x), 4) for x in new]
      [0.85, -2.0]

    References:
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
      PyTorch, ``torch/optim/adam.py``, ``_single_tensor_adam`` (``decoupled_weight_decay``).
    """
    _validate.check_scalar("lr", lr, low=0.0, allow_schedule=True)
    beta1, beta2 = _check_betas(betas)
    _validate.check_scalar("eps", eps, low=0.0)
    _validate.check_scalar("weight_decay", weight_decay, low=0.0)
    _validate.check_bool("amsgrad", amsgrad)
    _validate.check_bool("maximize", maximize)

    def init_fn(params):
        _validate.check_inexact_leaves("params", params)
        return _zero_state(TorchAdamWState, params, amsgrad)

    def update_fn(updates, state, params=None):
        _check_update_inputs("torch_adamw", updates, params)
        count = optax.safe_increment(state.count)
        scalars = _torch_scalars(state.count, count, lr, weight_decay, beta1, beta2, eps)
        leaf_step = functools.partial(
            _torch_leaf_step, scalars=scalars, beta1=beta1, maximize=maximize
        )
        new_updates, mu, nu, nu_max = _map_leaves(leaf_step, updates, params, state, amsgrad)
        return new_updates, TorchAdamWState(count=count, mu=mu, nu=nu, nu_max=nu_max)

    return optax.GradientTransformation(init_fn, update_fn)


# Keras.


class _KerasScalars(NamedTuple):
    """The scalars of one :func:`keras_adamw` step; each leaf casts them to its dtype."""

    t: jax.Array  # int32: Keras' iterations + 1
    learning_rate: jax.Array  # float32, as Keras keeps it in a variable
    weight_decay: Any
    beta_1: Any
    beta_2: Any
    epsilon: Any


def _exclusion_pattern(names: Any) -> re.Pattern | None:
    if names is None:
        return None
    if isinstance(names, str):
        names = (names,)
    if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"exclude_from_weight_decay must be None or a sequence of name strings; got {names!r}."
        )
    if not names:
        return None
    try:
        return re.compile("|".join(names))
    except re.error as err:
        raise ValueError(
            f"exclude_from_weight_decay={names!r} does not form a valid pattern: {err}."
        ) from err


def _check_real(params: Any) -> None:
    """Refuses complex params: Keras' variables are real."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if jnp.iscomplexobj(leaf):
            raise TypeError(
                f"params at {leaf_path(path)} are complex ({jnp.result_type(leaf)}); "
                "keras_adamw ports Keras, whose variables are real. Use torch_adamw or "
                "adamw_jax.adamw for complex parameters."
            )


def _decay_flags(pattern: re.Pattern | None, params: Any) -> list[bool]:
    """Per leaf of ``params``, whether it decays: its path does not match ``pattern``."""
    return [pattern is None or pattern.search(path) is None for path, _ in named_leaves(params)]


def _keras_leaf_step(
    g: jax.Array,
    p: jax.Array,
    m: jax.Array,
    v: jax.Array,
    v_max: jax.Array | None,
    decay: bool,
    *,
    scalars: _KerasScalars,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """One variable's Keras step: (update, mu, nu, nu_max), nu_max None without AMSGrad.

    Computed in the variable's dtype, as Keras computes it.
    """
    d = p.dtype
    lr = scalars.learning_rate.astype(d)
    g = g.astype(d)
    if decay:
        p_dec = p - p * jnp.asarray(scalars.weight_decay, d) * lr
    else:
        p_dec = p
    t = scalars.t.astype(d)
    b1_power = jnp.power(jnp.asarray(scalars.beta_1, d), t)
    b2_power = jnp.power(jnp.asarray(scalars.beta_2, d), t)
    alpha = lr * jnp.sqrt(1 - b2_power) / (1 - b1_power)
    new_m = m + (g - m) * _one_minus(scalars.beta_1, d)
    new_v = v + (jnp.square(g) - v) * _one_minus(scalars.beta_2, d)
    new_max = None if v_max is None else jnp.maximum(v_max, new_v)
    second = new_v if new_max is None else new_max
    new_p = p_dec - (new_m * alpha) / (jnp.sqrt(second) + jnp.asarray(scalars.epsilon, d))
    return (new_p - p).astype(d), new_m, new_v, new_max


def keras_adamw(
    learning_rate: ScalarOrSchedule = 1e-3,
    weight_decay: float = 0.004,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    amsgrad: bool = False,
    exclude_from_weight_decay: Sequence[str] | None = None,
) -> optax.GradientTransformation:
    r"""``keras.optimizers.AdamW`` (Keras 3) with its defaults and its arithmetic.

    At step :math:`t = 1, 2, \dots` (Keras' ``iterations + 1``) with learning rate
    :math:`\eta_t` (``learning_rate``, or ``learning_rate(t - 1)`` for a schedule), for each
    variable :math:`w` with gradient :math:`g`:

    .. math::

      w &\leftarrow w - w \lambda \eta_t \quad
          \text{(unless excluded from weight decay)} \\
      \alpha &= \eta_t \sqrt{1 - \beta_2^t} / (1 - \beta_1^t) \\
      m &\leftarrow m + (g - m)(1 - \beta_1), \qquad
      v \leftarrow v + (g^2 - v)(1 - \beta_2) \\
      \hat v &= \max(\hat v_{t-1}, v) \text{ with AMSGrad, else } v \\
      w &\leftarrow w - \frac{m \alpha}{\sqrt{\hat v} + \epsilon}

    in Keras' order of operations and in the variable's dtype. Note the two differences
    from PyTorch: :math:`\epsilon` (default ``1e-7``) is added to :math:`\sqrt{v}` without
    bias correction (the correction is folded into :math:`\alpha`), and the default decay
    is ``0.004``. The learning rate is rounded to float32 first, as Keras keeps it in a
    float32 variable (``keras.config.floatx()``); the other hyperparameters are cast from
    Python floats to the variable's dtype, as Keras does.

    Args:
      learning_rate: :math:`\eta`, in [0, inf): a number, a scalar array or an optax
        schedule ``step -> lr`` evaluated at the 0-based step (as Keras evaluates a
        ``LearningRateSchedule`` at ``iterations``).
      weight_decay: :math:`\lambda`, in [0, inf).
      beta_1: :math:`\beta_1`, in [0, 1).
      beta_2: :math:`\beta_2`, in [0, 1).
      epsilon: :math:`\epsilon`, in [0, inf).
      amsgrad: keep the running maximum of the velocity (Keras' ``amsgrad``).
      exclude_from_weight_decay: None, or names such as ``["bias", "scale"]``: a leaf whose
        path (as :mod:`adamw_jax.masks` writes it, e.g. ``"dense/bias"``) contains one of them
        does not decay. As in Keras' ``exclude_from_weight_decay(var_names=...)`` the names
        are joined into one regular expression, so plain names match as substrings.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`KerasAdamWState`; its
      ``update`` requires ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from adamw_jax import compat
      >>> tx = compat.keras_adamw(0.1, weight_decay=0.5, exclude_from_weight_decay=["bias"])
      >>> params = {"bias": jnp.array([1.0]), "kernel": jnp.array([1.0])}
      >>> state = tx.init(params)
      >>> grads = {"bias": jnp.array([0.5]), "kernel": jnp.array([0.5])}
      >>> updates, state = tx.update(grads, state, params)
      >>> new = optax.apply_updates(params, updates)
      >>> # bias: 1 - 0.1 * sign(g); the kernel also decays by 5 %: 1 * (1 - 0.05) - 0.1
      >>> round(float(new["bias"][0]), 4), round(float(new["kernel"][0]), 4)
      (0.9, 0.85)

    References:
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
      Keras 3, ``keras/src/optimizers/adam.py`` (``update_step``) and
      ``base_optimizer.py`` (``_apply_weight_decay``).
    """
    _validate.check_scalar("learning_rate", learning_rate, low=0.0, allow_schedule=True)
    _validate.check_scalar("weight_decay", weight_decay, low=0.0)
    _validate.check_scalar("beta_1", beta_1, low=0.0, high=1.0)
    _validate.check_scalar("beta_2", beta_2, low=0.0, high=1.0)
    _validate.check_scalar("epsilon", epsilon, low=0.0)
    _validate.check_bool("amsgrad", amsgrad)
    pattern = _exclusion_pattern(exclude_from_weight_decay)

    def init_fn(params):
        _validate.check_inexact_leaves("params", params)
        _check_real(params)
        return _zero_state(KerasAdamWState, params, amsgrad)

    def update_fn(updates, state, params=None):
        _check_update_inputs("keras_adamw", updates, params)
        count = optax.safe_increment(state.count)
        # Keras stores the learning rate in a float32 variable.
        eta32 = jnp.asarray(_numerics.value_at(learning_rate, state.count)).astype(jnp.float32)
        scalars = _KerasScalars(
            t=count,
            learning_rate=eta32,
            weight_decay=weight_decay,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
        )
        leaf_step = functools.partial(_keras_leaf_step, scalars=scalars)
        decays = _decay_flags(pattern, params)  # one flag per leaf, after nu_max
        new_updates, mu, nu, nu_max = _map_leaves(
            leaf_step, updates, params, state, amsgrad, decays
        )
        return new_updates, KerasAdamWState(count=count, mu=mu, nu=nu, nu_max=nu_max)

    return optax.GradientTransformation(init_fn, update_fn)
