"""Adam's first and second moment scaling, with bias correction, AMSGrad and Nesterov."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamw_jax import _moment_storage as _storage
from adamw_jax import _numerics, _packing, _validate
from adamw_jax._base import MomentDtype, ScalarOrArray

DEFAULT_BLOCK_SIZE = 256
DEFAULT_MIN_QUANTIZE_SIZE = 4096
MOMENT_LAYOUTS = ("tree", "packed")


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`.

    Attributes:
      count: number of updates taken, int32, saturating at ``2**31 - 1``.
      mu: first moment, like the params, stored in ``mu_dtype`` (with ``"int8"``, a
        :class:`~adamw_jax.quantize.QuantizedArray` per leaf of at least
        ``min_quantize_size`` elements). With ``moment_layout="packed"``, a
        :class:`~adamw_jax.PackedMoments` instead.
      nu: second moment, like the params (real even for complex params), in ``nu_dtype``
        (with float16 or ``"int8"``, its square root is stored); a
        :class:`~adamw_jax.PackedMoments` with ``moment_layout="packed"``.
      nu_max: running maximum of the bias-corrected second moment when ``amsgrad`` (laid
        out like ``nu``), otherwise an empty ``optax.EmptyState()``.
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates


def _check_moment_dtype(name: str, dtype: MomentDtype) -> None:
    if dtype is None:
        return
    if isinstance(dtype, (jax.Array, np.ndarray, jax.core.Tracer)):
        # What optax.inject_hyperparams makes of a dtype class: it takes jnp.bfloat16 (a
        # callable) for a schedule and passes its value at the step count.
        raise TypeError(
            f'{name} must be None, a floating dtype or "int8"; got an array {dtype!r}. Under '
            "optax.inject_hyperparams a dtype class such as jnp.bfloat16 is callable and taken "
            f"for a schedule: pass static_args=({name!r},), or the dtype's name as a string "
            '(e.g. "bfloat16").'
        )
    if isinstance(dtype, (int, float)) and not isinstance(dtype, bool):
        raise ValueError(
            f'{name} must be None, a floating dtype or "int8"; got the number {dtype!r}. (In '
            "Optax's positional order mu_dtype comes sixth, before weight_decay: pass "
            "weight_decay by name.)"
        )
    if _storage.is_int8(dtype):
        return
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as err:
        raise ValueError(
            f'{name} must be None, a floating dtype or "int8"; got {dtype!r}.'
        ) from err
    if not jnp.issubdtype(resolved, jnp.inexact):
        raise ValueError(f'{name} must be None, a floating dtype or "int8"; got {dtype!r}.')


def _storage_dtype(name: str, requested: MomentDtype, param: jax.Array, real: bool) -> jnp.dtype:
    """The dtype a moment of ``param`` is stored in."""
    param_dtype = jnp.result_type(param)
    is_complex = jnp.issubdtype(param_dtype, jnp.complexfloating)
    if requested is None:
        base = jnp.finfo(param_dtype).dtype if (real and is_complex) else param_dtype
        return jnp.dtype(base)
    requested = jnp.dtype(requested)
    if is_complex and not real and not jnp.issubdtype(requested, jnp.complexfloating):
        raise ValueError(
            f"{name}={requested} is real, but a parameter is complex ({param_dtype}); "
            "use None or a complex dtype for the first moment of complex parameters."
        )
    return requested


def scale_by_adam(
    b1: ScalarOrArray = 0.9,
    b2: ScalarOrArray = 0.999,
    eps: ScalarOrArray = 1e-8,
    eps_root: ScalarOrArray = 0.0,
    mu_dtype: MomentDtype = None,
    *,
    nesterov: bool = False,
    amsgrad: bool = False,
    bias_correction: bool = True,
    nu_dtype: MomentDtype = None,
    block_size: int | None = None,
    min_quantize_size: int | None = None,
    moment_layout: str = "tree",
) -> optax.GradientTransformation:
    r"""Rescales updates by Adam's bias-corrected first and second moments.

    With gradient :math:`g_t` at step :math:`t = 1, 2, \dots`:

    .. math::

      m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
      v_t = \beta_2 v_{t-1} + (1 - \beta_2) |g_t|^2, \\
      \hat m_t = m_t / (1 - \beta_1^t), \qquad \hat v_t = v_t / (1 - \beta_2^t), \\
      u_t = \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon).

    With ``amsgrad``, :math:`\hat v_t` is replaced by its running maximum
    :math:`\max(\hat v_{\max}, \hat v_t)` (as ``optax.scale_by_amsgrad`` keeps it). With
    ``nesterov``, :math:`\hat m_t` is replaced by the look-ahead
    :math:`\beta_1 m_t / (1 - \beta_1^{t+1}) + (1 - \beta_1) g_t / (1 - \beta_1^t)` (NAdam,
    as ``optax.nadamw``). Moments are stored in ``mu_dtype``/``nu_dtype`` but computed in
    float32, or in the parameters' dtype when that is wider; the direction is returned in
    the wider of the gradient's and the first moment's dtype. Where the denominator is
    exactly zero (``eps = 0`` and a zero second moment, i.e. no gradient yet) the direction
    is 0 rather than 0/0.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, in [0, inf).
      eps_root: added to the second moment inside the square root, in [0, inf).
      mu_dtype: storage dtype of the first moment: None (the params' dtype), a floating
        dtype such as ``jnp.bfloat16``, or ``"int8"`` (blockwise 8-bit, see below).
      nesterov: use Nesterov's look-ahead on the first moment (NAdam).
      amsgrad: use the running maximum of the bias-corrected second moment.
      bias_correction: divide the moments by :math:`1 - \beta^t`; False uses them raw.
      nu_dtype: storage dtype of the second moment: None (the params' real dtype), a
        floating dtype, or ``"int8"``. With float16 the square root of the moment is
        stored, so that small gradients' squares do not underflow to 0.
      block_size: with ``"int8"``, elements per quantization block along each leaf's last
        axis, an int in [1, inf); None means 256.
      min_quantize_size: with ``"int8"``, leaves with fewer elements than this, an int in
        [0, inf), are stored in float32 (biases, norm scales); None means 4096.
      moment_layout: ``"tree"`` (default): the moments are trees like the params, one
        array per leaf, which is what sharding the state like the params needs.
        ``"packed"``: the moments of small leaves (fewer than 65536 elements, same storage
        dtypes, up to 32 leaves) share one flat buffer, and larger leaves keep one buffer
        each; the state's moments are :class:`~adamw_jax.PackedMoments`. Same numbers (up to
        floating-point contraction), but on trees of many small leaves XLA compiles and
        runs far fewer kernels: faster steps and compiles. Floating moment dtypes only
        (not ``"int8"``). :func:`adamw_jax.sharding.state_shardings` places a large leaf's
        buffer like its param and replicates the shared ones (whose sharded gradients the
        step then gathers), so for small leaves sharded over many devices use ``"tree"``.

    The positional arguments and their defaults are ``optax.scale_by_adam``'s; the rest
    are keyword-only. ``block_size``, ``min_quantize_size``, ``mu_dtype`` and ``nu_dtype``
    set the state's shapes and dtypes, so they cannot be traced: under
    ``optax.inject_hyperparams`` (which turns ints into arrays and takes any callable, such
    as ``jnp.bfloat16``, for a schedule) name them in ``static_args``, or give a dtype by
    its name (``"bfloat16"``). A concrete integer 0-d array is accepted as its int.

    ``"int8"`` stores a moment as blockwise 8-bit codes with one float32 scale per block
    (:mod:`adamw_jax.quantize`): about 1.02 bytes per element instead of 4. The update
    dequantizes, computes in float32 and requantizes within the same step.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`ScaleByAdamState`.

    Example:
      >>> import jax.numpy as jnp
      >>> import adamw_jax
      >>> tx = adamw_jax.scale_by_adam()
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([1.0, -2.0, 0.5])}, state)
      >>> updates["w"].round(3)
      Array([ 1., -1.,  1.], dtype=float32)

    References:
      Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
      Reddi et al., "On the Convergence of Adam and Beyond" (AMSGrad), ICLR 2018.
      Dozat, "Incorporating Nesterov Momentum into Adam" (NAdam), ICLR workshop 2016.
    """
    _validate.check_scalar("b1", b1, low=0.0, high=1.0)
    _validate.check_scalar("b2", b2, low=0.0, high=1.0)
    _validate.check_scalar("eps", eps, low=0.0)
    _validate.check_scalar("eps_root", eps_root, low=0.0)
    _validate.check_bool("amsgrad", amsgrad)
    _validate.check_bool("nesterov", nesterov)
    _validate.check_bool("bias_correction", bias_correction)
    _check_moment_dtype("mu_dtype", mu_dtype)
    _check_moment_dtype("nu_dtype", nu_dtype)
    # Concrete 0-d integer arrays (what optax.inject_hyperparams makes of ints) are taken as
    # ints; traced ones are refused with a pointer to static_args.
    block_size = _validate.check_static_int("block_size", block_size)
    min_quantize_size = _validate.check_static_int("min_quantize_size", min_quantize_size)
    block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    min_quantize_size = (
        DEFAULT_MIN_QUANTIZE_SIZE if min_quantize_size is None else min_quantize_size
    )
    _storage.check_options(block_size, min_quantize_size)
    _validate.check_choice("moment_layout", moment_layout, MOMENT_LAYOUTS)
    packed = moment_layout == "packed"
    if packed and (_storage.is_int8(mu_dtype) or _storage.is_int8(nu_dtype)):
        raise ValueError(
            'moment_layout="packed" stores floating-point moments; mu_dtype or nu_dtype '
            f'"int8" needs moment_layout="tree" (got mu_dtype={mu_dtype!r}, '
            f"nu_dtype={nu_dtype!r})."
        )

    eps_is_positive = _is_positive_constant(eps)

    def zeros(name, requested, real):
        def make(p):
            if _storage.is_int8(requested):
                return _storage.int8_zeros(
                    name, p, real=real, block_size=block_size, min_quantize_size=min_quantize_size
                )
            # zeros_like, not zeros: under explicit sharding the moment's type carries the
            # param's sharding, as the step's output will.
            return jnp.zeros_like(p, dtype=_storage_dtype(name, requested, p, real))

        return make

    def init_fn(params: optax.Params) -> ScaleByAdamState:
        _validate.check_inexact_leaves("params", params)
        if packed:
            mu, nu = _packed_zeros(params, mu_dtype, nu_dtype)
        else:
            mu = jax.tree.map(zeros("mu_dtype", mu_dtype, real=False), params)
            nu = jax.tree.map(zeros("nu_dtype", nu_dtype, real=True), params)
        nu_max = jax.tree.map(jnp.zeros_like, nu) if amsgrad else optax.EmptyState()
        return ScaleByAdamState(jnp.zeros([], jnp.int32), mu, nu, nu_max)

    def update_fn(updates, state: ScaleByAdamState, params=None):
        del params
        _validate.check_updates_given("scale_by_adam", updates)
        if packed:
            _packing.check_matches(updates, state.mu)
        else:
            mu_leaves = _storage.per_param(updates, state.mu, block_size)
            nu_leaves = _storage.per_param(updates, state.nu, block_size)
            nu_max_leaves = (
                _storage.per_param(updates, state.nu_max, block_size)
                if amsgrad
                else [None] * len(mu_leaves)
            )
        _validate.check_inexact_leaves("updates", updates)
        count = _numerics.safe_increment(state.count)

        scalars_by_dtype: dict = {}

        def scalars(c):
            """This step's scalar factors for compute dtype ``c``, made once for all leaves."""
            if c not in scalars_by_dtype:
                r = jnp.finfo(c).dtype  # the real counterpart of the compute dtype
                beta1, beta2 = jnp.asarray(b1, r), jnp.asarray(b2, r)
                t = count.astype(r)
                if bias_correction:
                    c1, c2, c1_next = 1 - beta1**t, 1 - beta2**t, 1 - beta1 ** (t + 1)
                else:
                    c1 = c2 = c1_next = jnp.ones([], r)
                scalars_by_dtype[c] = dict(
                    r=r,
                    b1=beta1.astype(c),
                    one_minus_b1=(1 - beta1).astype(c),
                    b2=beta2,
                    one_minus_b2=1 - beta2,
                    c1=c1.astype(c),
                    c2=c2,
                    nesterov_m=(beta1 / c1_next).astype(c),
                    nesterov_g=((1 - beta1) / c1).astype(c),
                    eps=jnp.asarray(eps, r),
                    eps_root=jnp.asarray(eps_root, r),
                )
            return scalars_by_dtype[c]

        def leaf(g, mu, nu, nu_max):
            c = _numerics.compute_dtype(g.dtype, _storage.dtype_of(mu))
            k = scalars(c)
            r = k["r"]
            gc = g.astype(c)
            m = k["b1"] * _storage.load(mu, c, block_size) + k["one_minus_b1"] * gc
            g2 = jnp.real(gc * jnp.conj(gc)) if jnp.iscomplexobj(gc) else gc * gc
            v = k["b2"] * _storage.load_second(nu, r, block_size) + k["one_minus_b2"] * g2
            v_hat = v / k["c2"]
            if amsgrad:
                v_hat = jnp.maximum(_storage.load_second(nu_max, r, block_size), v_hat)
            if nesterov:
                m_hat = k["nesterov_m"] * m + k["nesterov_g"] * gc
            else:
                m_hat = m / k["c1"]
            denom = (jnp.sqrt(v_hat + k["eps_root"]) + k["eps"]).astype(c)
            u = m_hat / denom
            if not eps_is_positive:  # a zero second moment gives a zero direction, not 0/0
                u = jnp.where(denom == 0, jnp.zeros([], c), u)
            new_max = None
            if amsgrad:
                new_max = _storage.store_second(v_hat, nu_max, block_size, average=False)
            new_mu = _storage.store(m, mu, block_size)
            out_dtype = _numerics.wider(g.dtype, _storage.dtype_of(mu))
            return u.astype(out_dtype), new_mu, _storage.store_second(v, nu, block_size), new_max

        treedef = jax.tree.structure(updates)
        if packed:
            directions, mu, nu, nu_max = _packing.update(
                leaf,
                jax.tree.leaves(updates),
                state.mu,
                state.nu,
                state.nu_max if amsgrad else None,
                _numerics.wider,
                _numerics.compute_dtype,
            )
            nu_max = nu_max if amsgrad else state.nu_max
            new_updates = jax.tree.unflatten(treedef, directions)
            return new_updates, ScaleByAdamState(count, mu, nu, nu_max)
        out = [
            _storage.update_leaf(leaf, g, m, v, vm, block_size)
            for g, m, v, vm in zip(
                jax.tree.leaves(updates), mu_leaves, nu_leaves, nu_max_leaves, strict=True
            )
        ]
        new_updates, mu, nu, nu_max = _unzip(treedef, out, amsgrad, state.nu_max)
        return new_updates, ScaleByAdamState(count, mu, nu, nu_max)

    return optax.GradientTransformation(init_fn, update_fn)


def _packed_zeros(
    params: optax.Params, mu_dtype: MomentDtype, nu_dtype: MomentDtype
) -> tuple[_packing.PackedMoments, _packing.PackedMoments]:
    """The zero moments of the ``"packed"`` layout: one buffer per group of leaves."""
    leaves = jax.tree.leaves(params)
    mu_dtypes = [_storage_dtype("mu_dtype", mu_dtype, p, real=False) for p in leaves]
    nu_dtypes = [_storage_dtype("nu_dtype", nu_dtype, p, real=True) for p in leaves]
    keys = list(zip(mu_dtypes, nu_dtypes, strict=True))
    return _packing.zeros(params, mu_dtypes, keys), _packing.zeros(params, nu_dtypes, keys)


def _is_positive_constant(x: Any) -> bool:
    """Whether ``x`` is known, before tracing, to be a number > 0."""
    if isinstance(x, jax.core.Tracer):
        return False
    try:
        return float(x) > 0
    except (TypeError, ValueError):
        return False


def _unzip(treedef, out, amsgrad: bool, old_nu_max) -> tuple[Any, Any, Any, Any]:
    updates = jax.tree.unflatten(treedef, [o[0] for o in out])
    mu = jax.tree.unflatten(treedef, [o[1] for o in out])
    nu = jax.tree.unflatten(treedef, [o[2] for o in out])
    nu_max = jax.tree.unflatten(treedef, [o[3] for o in out]) if amsgrad else old_nu_max
    return updates, mu, nu, nu_max
