"""Adam's first and second moment scaling, with bias correction, AMSGrad and Nesterov.

:func:`scale_by_adam` is the Adam half of AdamW as an Optax transformation, with the state
:class:`ScaleByAdamState`. Its moments are stored in any floating dtype (float16's second
moment as its square root), as blockwise ``"int8"`` or ``"int4"`` codes, and laid out as
trees like the params or packed into shared buffers (``moment_layout``); every storage
computes the step in float32 or wider.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adamw_jax import _moment_storage as _storage
from adamw_jax import _numerics, _packing, _trees, _validate
from adamw_jax._base import MomentDtype, ScalarOrArray
from adamw_jax._moment_storage import MomentStorage

__all__ = ["ScaleByAdamState", "convert_state", "scale_by_adam"]
# How the Nesterov look-ahead is bias-corrected (``nesterov_bias_correction``).
NESTEROV_BIAS_CORRECTIONS = ("optax", "algoperf")


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`.

    Attributes:
      count: number of updates taken, int32, saturating at ``2**31 - 1``.
      mu: first moment, like the params, stored in ``mu_dtype`` (with ``"int8"``, a
        :class:`~adamw_jax.quantize.QuantizedArray` of 8-bit or 4-bit codes per leaf of at least
        ``min_quantize_size`` elements). With ``moment_layout="packed"``, a
        :class:`~adamw_jax.PackedMoments` instead.
      nu: second moment, like the params (real even for complex params), in ``nu_dtype``
        (with float16, ``"int8"`` or ``"int4"``, its square root is stored); a
        :class:`~adamw_jax.PackedMoments` with ``moment_layout="packed"``.
      nu_max: running maximum of the bias-corrected second moment when ``amsgrad`` (laid
        out like ``nu``), otherwise an empty ``optax.EmptyState()``.
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates


def scale_by_adam(
    b1: ScalarOrArray = 0.9,
    b2: ScalarOrArray = 0.999,
    eps: ScalarOrArray = 1e-8,
    eps_root: ScalarOrArray = 0.0,
    mu_dtype: MomentDtype = None,
    *,
    nesterov: bool = False,
    nesterov_bias_correction: str = "optax",
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
    as ``optax.nadamw``), or with ``nesterov_bias_correction="algoperf"`` by
    :math:`(\beta_1 m_t + (1 - \beta_1) g_t) / (1 - \beta_1^t)` (the NAdamW baseline of
    MLCommons AlgoPerf). Moments are stored in ``mu_dtype``/``nu_dtype`` but computed in
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
        dtype such as ``jnp.bfloat16``, or ``"int8"`` or ``"int4"`` (blockwise 8-bit or
        4-bit codes, see below).
      nesterov: use Nesterov's look-ahead on the first moment (NAdam).
      nesterov_bias_correction: how the look-ahead is bias-corrected, with ``nesterov``:
        ``"optax"`` (default; :math:`m_t` divided by :math:`1 - \beta_1^{t+1}`, the
        correction of the step it looks ahead to, and :math:`g_t` by :math:`1 - \beta_1^t`,
        as ``optax.nadamw``) or ``"algoperf"`` (both divided by :math:`1 - \beta_1^t`, as
        the NAdamW baseline of MLCommons AlgoPerf). ``"algoperf"`` is refused without
        ``nesterov``, where there is no look-ahead to correct.
      amsgrad: use the running maximum of the bias-corrected second moment.
      bias_correction: divide the moments by :math:`1 - \beta^t`; False uses them raw.
      nu_dtype: storage dtype of the second moment: None (the params' real dtype), a
        floating dtype, ``"int8"`` or ``"int4"``. With float16 the square root of the
        moment is stored, so that small gradients' squares do not underflow to 0.
      block_size: with ``"int8"``/``"int4"``, elements per quantization block along each
        leaf's last axis, an int in [1, inf), even with ``"int4"``; None means 128 when
        either moment is ``"int4"``, else 256.
      min_quantize_size: with ``"int8"``/``"int4"``, leaves with fewer elements than
        this, an int in [0, inf), are stored in float32 (biases, norm scales); None means
        4096.
      moment_layout: ``"tree"`` (default): the moments are trees like the params, one
        array per leaf, which is what sharding the state like the params needs.
        ``"packed"``: the moments of small leaves (fewer than 65536 elements, same storage
        dtypes, up to 32 leaves) share one flat buffer, and larger leaves keep one buffer
        each; the state's moments are :class:`~adamw_jax.PackedMoments`. Same numbers (up to
        floating-point contraction), but on trees of many small leaves XLA compiles and
        runs far fewer kernels: faster steps and compiles. Floating moment dtypes only
        (not ``"int8"``/``"int4"``). :func:`adamw_jax.sharding.state_shardings` places a
        large leaf's buffer like its param and replicates the shared ones (whose sharded
        gradients the step then gathers), so for small leaves sharded over many devices use
        ``"tree"``.

    The positional arguments and their defaults are ``optax.scale_by_adam``'s; the rest
    are keyword-only. ``block_size``, ``min_quantize_size``, ``mu_dtype`` and ``nu_dtype``
    set the state's shapes and dtypes, so they cannot be traced: under
    ``optax.inject_hyperparams`` (which turns ints into arrays and takes any callable, such
    as ``jnp.bfloat16``, for a schedule) name them in ``static_args``, or give a dtype by
    its name (``"bfloat16"``). A concrete integer 0-d array is accepted as its int.

    ``"int8"`` stores a moment as blockwise 8-bit codes with one float32 scale per block
    (:mod:`adamw_jax.quantize`): about 1.02 bytes per element instead of 4. ``"int4"``
    stores 4-bit codes, two per byte, with a scale per block of 128: about 0.53 bytes per
    element; the second moment's code book has no code for 0 (Li et al.), and both moments
    are rounded stochastically. The update dequantizes, computes in float32 and
    requantizes within the same step.

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
      Li, Chen & Zhu, "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023.
    """
    storage = _storage.moment_storage(
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        block_size=block_size,
        min_quantize_size=min_quantize_size,
        moment_layout=moment_layout,
    )
    _validate.check_scalar("b1", b1, low=0.0, high=1.0)
    _validate.check_scalar("b2", b2, low=0.0, high=1.0)
    _validate.check_scalar("eps", eps, low=0.0)
    _validate.check_scalar("eps_root", eps_root, low=0.0)
    _validate.check_bool("amsgrad", amsgrad)
    _validate.check_bool("nesterov", nesterov)
    _validate.check_bool("bias_correction", bias_correction)
    check_nesterov_bias_correction(nesterov_bias_correction, nesterov)
    packed = storage.layout == "packed"
    # Unless eps is known to be positive, a zero denominator gives a zero direction, not 0/0.
    guard_zero_denominator = not _is_positive_constant(eps)

    def init_fn(params: optax.Params) -> ScaleByAdamState:
        _validate.check_inexact_leaves("params", params)
        mu, nu = (_packed_zeros if packed else _tree_zeros)(params, storage)
        nu_max = jax.tree.map(jnp.zeros_like, nu) if amsgrad else optax.EmptyState()
        return ScaleByAdamState(jnp.zeros([], jnp.int32), mu, nu, nu_max)

    def update_fn(
        updates: optax.Updates, state: ScaleByAdamState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ScaleByAdamState]:
        del params
        _validate.check_updates_given("scale_by_adam", updates)
        count = optax.safe_increment(state.count)
        scalars_for = functools.cache(
            functools.partial(
                _adam_scalars,
                count=count,
                b1=b1,
                b2=b2,
                eps=eps,
                eps_root=eps_root,
                bias_correction=bias_correction,
                nesterov_bias_correction=nesterov_bias_correction,
            )
        )
        step = functools.partial(
            _adam_step,
            scalars_for=scalars_for,
            nesterov=nesterov,
            guard_zero_denominator=guard_zero_denominator,
        )
        if packed:
            directions, mu, nu, nu_max = _update_packed(step, updates, state, amsgrad, storage)
        else:
            directions, mu, nu, nu_max = _update_tree(step, updates, state, amsgrad, storage)
        return directions, ScaleByAdamState(count, mu, nu, nu_max)

    return optax.GradientTransformation(init_fn, update_fn)


def check_nesterov_bias_correction(nesterov_bias_correction: Any, nesterov: bool) -> None:
    """Refuses an unknown ``nesterov_bias_correction``, and ``"algoperf"`` without Nesterov."""
    _validate.check_choice(
        "nesterov_bias_correction", nesterov_bias_correction, NESTEROV_BIAS_CORRECTIONS
    )
    if nesterov_bias_correction != "optax" and not nesterov:
        raise ValueError(
            f"nesterov_bias_correction={nesterov_bias_correction!r} corrects the Nesterov "
            "look-ahead and needs nesterov=True; without it leave the default 'optax'."
        )


def nesterov_weights(
    beta1: jax.Array,
    correction1: jax.Array,
    next_correction1: jax.Array,
    nesterov_bias_correction: str,
) -> tuple[jax.Array, jax.Array]:
    r"""The weights of :math:`m_t` and :math:`g_t` in Nesterov's look-ahead.

    ``correction1`` and ``next_correction1`` are :math:`1 - \beta_1^t` and
    :math:`1 - \beta_1^{t+1}` (both 1 without bias correction). ``"optax"``:
    :math:`(\beta_1 / (1 - \beta_1^{t+1}), (1 - \beta_1) / (1 - \beta_1^t))`;
    ``"algoperf"``: :math:`(\beta_1 / (1 - \beta_1^t), (1 - \beta_1) / (1 - \beta_1^t))`.
    """
    momentum_correction = (
        correction1 if nesterov_bias_correction == "algoperf" else next_correction1
    )
    return beta1 / momentum_correction, (1 - beta1) / correction1


class _AdamScalars(NamedTuple):
    r"""One step's scalar factors of :func:`_adam_step`, for one compute dtype.

    The first moment is computed in the compute dtype (complex for complex params), the
    second moment in its real counterpart; each factor is in the dtype of what it
    multiplies. Without bias correction both corrections are 1.

    Attributes:
      real_dtype: the real counterpart of the compute dtype (the second moment's).
      b1: :math:`\beta_1` (compute dtype).
      one_minus_b1: :math:`1 - \beta_1` (compute dtype).
      b2: :math:`\beta_2` (real).
      one_minus_b2: :math:`1 - \beta_2` (real).
      bias_correction1: :math:`1 - \beta_1^t` (compute dtype).
      bias_correction2: :math:`1 - \beta_2^t` (real).
      nesterov_momentum: :math:`\beta_1 / (1 - \beta_1^{t+1})` (``"algoperf"``:
        :math:`\beta_1 / (1 - \beta_1^t)`), the weight of :math:`m_t` in Nesterov's
        look-ahead (compute dtype).
      nesterov_gradient: :math:`(1 - \beta_1) / (1 - \beta_1^t)`, the weight of
        :math:`g_t` in it (compute dtype).
      eps: :math:`\epsilon` (real).
      eps_root: :math:`\epsilon_{root}` (real).
      rounding_salt: the step count as uint32, mixed into the random bits of the second
        moment's stochastic rounding (bfloat16, ``"int8"`` and ``"int4"`` storage) and of
        the ``"int4"`` first moment's.
    """

    real_dtype: jnp.dtype
    b1: jax.Array
    one_minus_b1: jax.Array
    b2: jax.Array
    one_minus_b2: jax.Array
    bias_correction1: jax.Array
    bias_correction2: jax.Array
    nesterov_momentum: jax.Array
    nesterov_gradient: jax.Array
    eps: jax.Array
    eps_root: jax.Array
    rounding_salt: jax.Array


def _adam_scalars(
    compute_dtype: jnp.dtype,
    *,
    count: jax.Array,
    b1: ScalarOrArray,
    b2: ScalarOrArray,
    eps: ScalarOrArray,
    eps_root: ScalarOrArray,
    bias_correction: bool,
    nesterov_bias_correction: str = "optax",
) -> _AdamScalars:
    """The :class:`_AdamScalars` of step ``count`` (1 for the first step) in ``compute_dtype``."""
    real_dtype = jnp.finfo(compute_dtype).dtype
    beta1, beta2 = jnp.asarray(b1, real_dtype), jnp.asarray(b2, real_dtype)
    t = count.astype(real_dtype)
    if bias_correction:
        correction1, correction2 = 1 - beta1**t, 1 - beta2**t
        next_correction1 = 1 - beta1 ** (t + 1)
    else:
        correction1 = correction2 = next_correction1 = jnp.ones([], real_dtype)
    nesterov_momentum, nesterov_gradient = nesterov_weights(
        beta1, correction1, next_correction1, nesterov_bias_correction
    )
    return _AdamScalars(
        real_dtype=real_dtype,
        b1=beta1.astype(compute_dtype),
        one_minus_b1=(1 - beta1).astype(compute_dtype),
        b2=beta2,
        one_minus_b2=1 - beta2,
        bias_correction1=correction1.astype(compute_dtype),
        bias_correction2=correction2,
        nesterov_momentum=nesterov_momentum.astype(compute_dtype),
        nesterov_gradient=nesterov_gradient.astype(compute_dtype),
        eps=jnp.asarray(eps, real_dtype),
        eps_root=jnp.asarray(eps_root, real_dtype),
        rounding_salt=count.astype(jnp.uint32),
    )


def _adam_step(
    grad: jax.Array,
    mu: Any,
    nu: Any,
    nu_max: Any,
    *,
    scalars_for: Callable[[jnp.dtype], _AdamScalars],
    nesterov: bool,
    guard_zero_denominator: bool,
) -> tuple[jax.Array, Any, Any, Any]:
    r"""Adam's step on one leaf (or one packed buffer): the direction and the new moments.

    With gradient :math:`g`, stored moments :math:`m, v` (and :math:`\hat v_{\max}` with
    AMSGrad, i.e. when ``nu_max`` is not None), at step :math:`t`:

    .. math::

      m_t = \beta_1 m + (1 - \beta_1) g, \qquad
      v_t = \beta_2 v + (1 - \beta_2) |g|^2, \\
      \hat v_t = v_t / (1 - \beta_2^t)
        \quad (\text{AMSGrad: } \max(\hat v_{\max}, v_t / (1 - \beta_2^t))), \\
      \hat m_t = m_t / (1 - \beta_1^t)
        \quad (\text{Nesterov: } \beta_1 m_t / (1 - \beta_1^{t+1})
                + (1 - \beta_1) g / (1 - \beta_1^t)), \\
      u_t = \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon).

    The first moment and the direction are computed in the compute dtype
    (:func:`~adamw_jax._numerics.compute_dtype` of the gradient's and the first moment's
    dtypes: float32, or wider), the second moment in its real counterpart, with the factors
    ``scalars_for(compute_dtype)``. With ``guard_zero_denominator``
    (``eps`` not known to be positive) the direction is 0 where the denominator is exactly
    0 (a zero second moment: no gradient yet), not 0/0.

    Args:
      grad: the leaf's gradient.
      mu, nu, nu_max: its stored moments, as :mod:`adamw_jax._moment_storage` keeps them
        (``nu_max`` None without AMSGrad); they are loaded and stored through it.
      scalars_for: the step's :class:`_AdamScalars` for a compute dtype (made once per dtype).
      nesterov: use Nesterov's look-ahead for :math:`\hat m_t`.
      guard_zero_denominator: map a zero denominator to a zero direction.

    Returns:
      ``(u_t, m_t, v_t, new nu_max)``: the direction in the wider of the gradient's and the
      first moment's dtypes, the moments stored like ``mu``, ``nu`` (and ``nu_max``, None
      without AMSGrad), :math:`\hat v_t` being AMSGrad's new running maximum.
    """
    compute_dtype = _numerics.compute_dtype(grad.dtype, _storage.dtype_of(mu))
    scalars = scalars_for(compute_dtype)
    real_dtype = scalars.real_dtype
    g = grad.astype(compute_dtype)  # g of the math above
    m = scalars.b1 * _storage.load(mu, compute_dtype) + scalars.one_minus_b1 * g
    g_squared = jnp.real(g * jnp.conj(g)) if jnp.iscomplexobj(g) else g * g
    old_v = _storage.load_second(nu, real_dtype)
    v = scalars.b2 * old_v + scalars.one_minus_b2 * g_squared
    v_hat = v / scalars.bias_correction2
    if nu_max is not None:  # AMSGrad
        v_hat = jnp.maximum(_storage.load_second(nu_max, real_dtype), v_hat)
    if nesterov:
        m_hat = scalars.nesterov_momentum * m + scalars.nesterov_gradient * g
    else:
        m_hat = m / scalars.bias_correction1
    denominator = (jnp.sqrt(v_hat + scalars.eps_root) + scalars.eps).astype(compute_dtype)
    direction = m_hat / denominator
    if guard_zero_denominator:
        direction = jnp.where(denominator == 0, jnp.zeros([], compute_dtype), direction)
    new_max = None
    if nu_max is not None:
        new_max = _storage.store_second(v_hat, nu_max, average=False, salt=scalars.rounding_salt)
    new_mu = _storage.store(m, mu, salt=scalars.rounding_salt)
    out_dtype = _numerics.wider(grad.dtype, _storage.dtype_of(mu))
    new_nu = _storage.store_second(v, nu, salt=scalars.rounding_salt)
    return direction.astype(out_dtype), new_mu, new_nu, new_max


def _update_tree(
    step: Callable[..., tuple[Any, ...]],
    updates: optax.Updates,
    state: ScaleByAdamState,
    amsgrad: bool,
    storage: MomentStorage,
) -> tuple[optax.Updates, Any, Any, Any]:
    """The ``"tree"`` layout's step: ``step`` on each leaf; the directions and new moments.

    The state's moments are matched to the leaves of ``updates`` first (a quantized moment
    rebuilt from whatever container a framework made of it); ``"int8"``/``"int4"`` moments
    are encoded in the pass that computes them
    (:func:`~adamw_jax._moment_storage.update_leaf`).
    """
    mu = _storage.per_param(updates, state.mu, storage)
    nu = _storage.per_param(updates, state.nu, storage, second=True)
    if amsgrad:
        nu_max = _storage.per_param(updates, state.nu_max, storage, second=True)
    else:
        nu_max = [None] * len(mu)
    _validate.check_inexact_leaves("updates", updates)
    rows = [
        _storage.update_leaf(step, grad, *moments, storage)
        for grad, *moments in zip(jax.tree.leaves(updates), mu, nu, nu_max, strict=True)
    ]
    directions, mu, nu, new_max = _trees.unzip(jax.tree.structure(updates), rows, 4)
    return directions, mu, nu, new_max if amsgrad else state.nu_max


def _update_packed(
    step: Callable[..., tuple[Any, ...]],
    updates: optax.Updates,
    state: ScaleByAdamState,
    amsgrad: bool,
    storage: MomentStorage,
) -> tuple[optax.Updates, Any, Any, Any]:
    """The ``"packed"`` layout's step: ``step`` on each buffer; the directions, new moments."""
    _storage.check_packed(updates, state.mu, storage)
    _storage.check_packed(updates, state.nu, storage, second=True)
    _validate.check_inexact_leaves("updates", updates)
    directions, mu, nu, new_max = _packing.update(
        step, jax.tree.leaves(updates), state.mu, state.nu, state.nu_max if amsgrad else None
    )
    directions = jax.tree.unflatten(jax.tree.structure(updates), directions)
    return directions, mu, nu, new_max if amsgrad else state.nu_max


def _tree_zeros(params: optax.Params, storage: MomentStorage) -> tuple[Any, Any]:
    """The zero moments of the ``"tree"`` layout: trees like the params."""
    mu = jax.tree.map(lambda param: _storage.zeros(param, storage), params)
    nu = jax.tree.map(lambda param: _storage.zeros_second(param, storage), params)
    return mu, nu


def _packed_zeros(
    params: optax.Params, storage: MomentStorage
) -> tuple[_packing.PackedMoments, _packing.PackedMoments]:
    """The zero moments of the ``"packed"`` layout: one buffer per group of leaves."""
    keys = [_storage.floating_dtypes(param, storage) for param in jax.tree.leaves(params)]
    mu_dtypes = [mu_dtype for mu_dtype, _ in keys]
    nu_dtypes = [nu_dtype for _, nu_dtype in keys]
    return _packing.zeros(params, mu_dtypes, keys), _packing.zeros(params, nu_dtypes, keys)


def _is_positive_constant(x: Any) -> bool:
    """Whether ``x`` is known, before tracing, to be a number > 0."""
    if isinstance(x, jax.core.Tracer):
        return False
    try:
        return float(x) > 0
    except (TypeError, ValueError):
        return False


def convert_state(
    state: optax.OptState, tx: optax.GradientTransformation, params: optax.Params
) -> optax.OptState:
    """``state`` with its Adam moments re-stored in the storage ``tx`` keeps them in.

    To change ``mu_dtype``, ``nu_dtype``, ``block_size`` or ``min_quantize_size`` in the
    middle of a run (or to restore a checkpoint into an optimizer built with other
    settings, which ``update`` refuses, naming the leaf): every
    :class:`ScaleByAdamState` in ``state`` gets the moments that ``tx.init(params)`` would
    have, in format, holding ``state``'s values, each decoded and rounded to nearest in the
    new format (so a value moves by at most half a step of the new code book, the block's
    scale times the book's step around it); every other leaf (step counts, other
    transformations' states) is kept. Only the tree layout (``moment_layout="tree"``) is
    converted.

    Args:
      state: the optimizer state to convert (of an optimizer built like ``tx`` except for
        its storage keywords).
      tx: the optimizer the state is for, after the change.
      params: the params (arrays or ``jax.ShapeDtypeStruct``; only shapes and dtypes are
        read).

    Returns:
      A state with the structure of ``tx.init(params)``.

    Raises:
      ValueError: if ``state`` and ``tx.init(params)`` differ other than in how their Adam
        moments are stored (another chain, AMSGrad on one side only, the packed layout).

    Example:
      >>> import jax.numpy as jnp
      >>> import adamw_jax
      >>> params = {"w": jnp.ones((64, 64))}
      >>> state = adamw_jax.adamw(1e-3).init(params)  # ... trained in float32, then:
      >>> int8 = adamw_jax.adamw(1e-3, mu_dtype="int8", nu_dtype="int8")
      >>> state = adamw_jax.convert_state(state, int8, params)
      >>> type(state[0].mu["w"]).__name__, state[0].mu["w"].codes.dtype
      ('QuantizedArray', dtype('int8'))
    """
    target = jax.eval_shape(tx.init, params)
    is_adam = lambda node: isinstance(node, ScaleByAdamState)  # noqa: E731
    nodes, treedef = jax.tree.flatten(state, is_leaf=is_adam)
    target_nodes, target_treedef = jax.tree.flatten(target, is_leaf=is_adam)
    if treedef != target_treedef:
        raise ValueError(
            "state and tx.init(params) differ other than in their Adam moments' storage: "
            f"{treedef} vs {target_treedef}."
        )
    out = [
        _convert_adam_state(node, like, params) if is_adam(node) else node
        for node, like in zip(nodes, target_nodes, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def _convert_adam_state(
    state: ScaleByAdamState, like: ScaleByAdamState, params: optax.Params
) -> ScaleByAdamState:
    """One :class:`ScaleByAdamState` with its moments re-stored like ``like``'s."""
    treedef = jax.tree.structure(params)
    if any(isinstance(x, _packing.PackedMoments) for x in (state.mu, like.mu)):
        raise ValueError('convert_state converts moment_layout="tree" moments only.')
    has_max = [not isinstance(s.nu_max, optax.EmptyState) for s in (state, like)]
    if has_max[0] != has_max[1]:
        raise ValueError("convert_state cannot add or drop AMSGrad's maximum (amsgrad=...).")

    def convert(moments, target, second):
        stored = treedef.flatten_up_to(moments)
        shapes = treedef.flatten_up_to(target)
        new = [_storage.convert(s, t, second=second) for s, t in zip(stored, shapes, strict=True)]
        return jax.tree.unflatten(treedef, new)

    mu = convert(state.mu, like.mu, False)
    nu = convert(state.nu, like.nu, True)
    nu_max = convert(state.nu_max, like.nu_max, True) if has_max[0] else state.nu_max
    return ScaleByAdamState(state.count, mu, nu, nu_max)
