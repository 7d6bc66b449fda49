"""Ready-made optimizers: AdamW (decoupled decay) and Adam with an L2 penalty."""

import optax

from adamw_jax import _validate, precision
from adamw_jax._base import (
    DecayTarget,
    Hyperparameter,
    Mask,
    MomentDtype,
    ScalarOrArray,
    ScalarOrSchedule,
)
from adamw_jax.decay import add_decayed_weights, decoupled_weight_decay
from adamw_jax.moments import scale_by_adam
from adamw_jax.stability import cautious as cautious_updates

__all__ = ["adam", "adamw"]


@_validate.refuses_pytorch_keywords
def adamw(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrArray = 0.9,
    b2: ScalarOrArray = 0.999,
    eps: ScalarOrArray = 1e-8,
    eps_root: ScalarOrArray = 0.0,
    mu_dtype: MomentDtype = None,
    weight_decay: Hyperparameter = 1e-4,
    mask: Mask = None,
    *,
    nesterov: bool = False,
    nesterov_bias_correction: str = "optax",
    decay_coupling: str = "lr",
    peak_learning_rate: float | None = None,
    amsgrad: bool = False,
    nu_dtype: MomentDtype = None,
    block_size: int | None = None,
    min_quantize_size: int | None = None,
    param_update: str | None = None,
    moment_layout: str = "tree",
    cautious: bool = False,
    cautious_weight_decay: bool = False,
    decay_target: DecayTarget = "zero",
) -> optax.GradientTransformation:
    r"""Adam with decoupled weight decay (AdamW).

    .. math::

      m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
      v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \\
      w_t = w_{t-1} - \eta_t \frac{m_t / (1 - \beta_1^t)}
            {\sqrt{v_t / (1 - \beta_2^t) + \epsilon_{root}} + \epsilon} - d_t w_{t-1},

    with :math:`d_t = \eta_t\lambda_t` (``"lr"``), :math:`(\eta_t/\eta_{peak})\lambda_t`
    (``"schedule"``), :math:`\lambda_t` (``"none"``) or :math:`(\eta_t^2/\eta_{peak})\lambda_t`
    (``"adamc"``) on the leaves ``mask`` selects, and
    :math:`d_t = 0` elsewhere. The chain of :func:`adamw_jax.scale_by_adam` and
    :func:`adamw_jax.decoupled_weight_decay`. With ``decay_coupling="lr"`` it takes the
    same steps as ``optax.adamw`` and ``torch.optim.AdamW`` (up to their order of
    operations; see :mod:`adamw_jax.compat` for exact ports).

    The positional arguments, their order and their defaults are ``optax.adamw``'s, so the
    same call builds the same optimizer (``learning_rate`` is required, and
    ``weight_decay`` defaults to Optax's 1e-4, not PyTorch's 1e-2:
    :func:`adamw_jax.compat.torch_adamw` keeps PyTorch's); the rest are keyword-only.

    Args:
      learning_rate: :math:`\eta_t`, in [0, inf): a number, a scalar array or a schedule
        (a callable of the step count).
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, in [0, inf).
      eps_root: added to the second moment inside the square root, in [0, inf).
      mu_dtype: storage of the first moment: None (the params' dtype), a floating dtype,
        ``"int8"`` or ``"int4"``. This and the other storage keywords (``nu_dtype``,
        ``block_size``, ``min_quantize_size``, ``moment_layout``) are described once, in
        :func:`adamw_jax.scale_by_adam`.
      weight_decay: :math:`\lambda_t`, in [0, inf): a number, a scalar array or a
        schedule; 1e-4 by default.
      mask: which leaves decay: None (all), a bool pytree like the params, or a callable
        ``params -> bool pytree`` such as ``adamw_jax.masks.by_ndim(2)``.
      nesterov: Nesterov look-ahead on the first moment (as ``optax.nadamw``).
      nesterov_bias_correction: ``"optax"`` (default, as ``optax.nadamw``) or
        ``"algoperf"`` (as AlgoPerf's NAdamW), with ``nesterov`` (see
        :func:`adamw_jax.scale_by_adam`).
      decay_coupling: ``"lr"`` (default, as PyTorch and Optax), ``"schedule"`` (the paper),
        ``"none"`` (independent decay) or ``"adamc"`` (AdamC, for normalized layers: see
        :func:`adamw_jax.decoupled_weight_decay`).
      peak_learning_rate: :math:`\eta_{peak}` in (0, inf), for ``"schedule"`` or
        ``"adamc"`` with a learning-rate schedule.
      amsgrad: use the running maximum of the bias-corrected second moment.
      nu_dtype, block_size, min_quantize_size, moment_layout: the moments' storage, as
        :func:`adamw_jax.scale_by_adam` describes them.
      param_update: None, or how updates land on bfloat16/float16 params so that small
        steps and the decay are not rounded away: ``"compensated"`` (Kahan buffer in the
        state) or ``"stochastic_rounding"`` (see :func:`adamw_jax.low_precision_update`).
      cautious: a bool; True keeps Adam's direction only where its sign agrees with the
        gradient's, rescaled by the kept fraction (cautious updates,
        :func:`adamw_jax.cautious`). The state is unchanged.
      cautious_weight_decay: a bool; True decays only where the direction and
        :math:`w - w_{ref}` agree in sign (see :func:`adamw_jax.decoupled_weight_decay`).
      decay_target: what the decay pulls toward: ``"zero"`` (default), ``"init"`` (the
        params given to ``init``, stored in the state: one more copy of the params) or a
        pytree like the params (see :func:`adamw_jax.decoupled_weight_decay`).

    Under ``optax.inject_hyperparams``, name a callable ``mask`` in ``static_args``, and
    the storage keywords as :func:`adamw_jax.scale_by_adam` says: they set the state's
    structure and cannot be traced.

    PyTorch's keywords ``lr``, ``betas`` and ``maximize`` are refused with a TypeError that
    names this function's spelling and :func:`adamw_jax.compat.torch_adamw`, the port with
    PyTorch's signature and defaults.

    Returns:
      An ``optax.GradientTransformation``; its ``update`` requires ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import adamw_jax
      >>> params = {"w": jnp.ones(4), "b": jnp.zeros(())}
      >>> tx = adamw_jax.adamw(1e-2, weight_decay=0.1, mask=adamw_jax.masks.by_ndim(1))
      >>> state = tx.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum((p["w"] - 3.0) ** 2) + p["b"] ** 2)(params)
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> params["w"].round(4)
      Array([1.009, 1.009, 1.009, 1.009], dtype=float32)

    References:
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
      Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
      Liang et al., "Cautious Optimizers", arXiv:2411.16085, 2024 (``cautious``).
      Chen et al., "Cautious Weight Decay", arXiv:2510.12402, 2025
      (``cautious_weight_decay``).
    """
    _validate.check_bool("cautious", cautious)
    _validate.check_bool("cautious_weight_decay", cautious_weight_decay)
    if param_update is not None:
        _validate.check_choice("param_update", param_update, (None, *precision.METHODS))
    scaling = scale_by_adam(
        b1,
        b2,
        eps,
        eps_root,
        mu_dtype,
        nesterov=nesterov,
        nesterov_bias_correction=nesterov_bias_correction,
        amsgrad=amsgrad,
        nu_dtype=nu_dtype,
        block_size=block_size,
        min_quantize_size=min_quantize_size,
        moment_layout=moment_layout,
    )
    steps = [
        cautious_updates(scaling) if cautious else scaling,
        decoupled_weight_decay(
            learning_rate,
            weight_decay,
            mask=mask,
            decay_coupling=decay_coupling,
            peak_learning_rate=peak_learning_rate,
            cautious=cautious_weight_decay,
            decay_target=decay_target,
        ),
    ]
    if param_update is not None:
        steps.append(precision.low_precision_update(param_update))
    return optax.chain(*steps)


@_validate.refuses_pytorch_keywords
def adam(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrArray = 0.9,
    b2: ScalarOrArray = 0.999,
    eps: ScalarOrArray = 1e-8,
    eps_root: ScalarOrArray = 0.0,
    mu_dtype: MomentDtype = None,
    *,
    nesterov: bool = False,
    nesterov_bias_correction: str = "optax",
    l2: Hyperparameter = 0.0,
    mask: Mask = None,
    amsgrad: bool = False,
    nu_dtype: MomentDtype = None,
    block_size: int | None = None,
    min_quantize_size: int | None = None,
    moment_layout: str = "tree",
) -> optax.GradientTransformation:
    r"""Adam with an L2 penalty added to the gradient (the coupling AdamW removes).

    .. math::

      \tilde g_t = g_t + \lambda w_{t-1}, \qquad
      w_t = w_{t-1} - \eta_t \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}

    where the moments are those of :math:`\tilde g`, so the penalty is rescaled by
    :math:`1/\sqrt{\hat v}` like the gradient: leaves with large gradients decay less.
    The chain ``add_decayed_weights(l2) -> scale_by_adam -> scale_by_learning_rate``.
    The positional arguments, their order and their defaults are ``optax.adam``'s
    (``learning_rate`` is required); ``l2`` and the rest are keyword-only. PyTorch's
    ``lr``, ``betas`` and ``maximize`` are refused as in :func:`adamw`.

    Args:
      learning_rate: :math:`\eta_t`, in [0, inf): a number, a scalar array or a schedule
        (a callable of the step count).
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, in [0, inf).
      eps_root: added to the second moment inside the square root, in [0, inf).
      mu_dtype: storage of the first moment: None (the params' dtype), a floating dtype,
        ``"int8"`` or ``"int4"``. This and the other storage keywords (``nu_dtype``,
        ``block_size``, ``min_quantize_size``, ``moment_layout``) are described once, in
        :func:`adamw_jax.scale_by_adam`.
      nesterov: Nesterov look-ahead on the first moment.
      nesterov_bias_correction: ``"optax"`` or ``"algoperf"``, with ``nesterov`` (as in
        :func:`adamw`).
      l2: :math:`\lambda`, the L2 coefficient, in [0, inf) (the penalty is
        :math:`\tfrac{\lambda}{2}\lVert w \rVert^2`): a number, a scalar array or a schedule.
      mask: which leaves are penalized (as in :func:`adamw`).
      amsgrad: use the running maximum of the bias-corrected second moment.
      nu_dtype, block_size, min_quantize_size, moment_layout: the moments' storage, as
        :func:`adamw_jax.scale_by_adam` describes them.

    Returns:
      An ``optax.GradientTransformation``; its ``update`` requires ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> import adamw_jax
      >>> tx = adamw_jax.adam(0.1, l2=1e-3)
      >>> params = {"w": jnp.ones(2)}
      >>> updates, _ = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
      >>> [round(float(x), 4) for x in updates["w"]]
      [-0.1, -0.1]

    References:
      Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
    """
    _validate.check_scalar("learning_rate", learning_rate, low=0.0, allow_schedule=True)
    _validate.check_scalar("l2", l2, low=0.0, allow_schedule=True)
    return optax.chain(
        add_decayed_weights(l2, mask),
        scale_by_adam(
            b1,
            b2,
            eps,
            eps_root,
            mu_dtype,
            nesterov=nesterov,
            nesterov_bias_correction=nesterov_bias_correction,
            amsgrad=amsgrad,
            nu_dtype=nu_dtype,
            block_size=block_size,
            min_quantize_size=min_quantize_size,
            moment_layout=moment_layout,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
