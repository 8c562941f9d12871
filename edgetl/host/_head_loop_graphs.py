"""Head training graphs: every optimizer step of a step plan in one runtime call.

These are the bundle's only training graphs. They take a whole step plan and loop inside
the runtime, so the weights and optimizer state stay there between steps; a plan of one
step (S = 1) is a single optimizer step, which is how a client without a loop of its own
takes one step. The step is :func:`edgetl.bundle._head.reference_step` (the head contract);
its arrangement was chosen by measurement (onnxruntime 1.32 and ai-edge-litert 2.3, one
thread, D=256, C=10, batch 16; per step):

* **Step plan.** ``order[S, B]`` lists the examples of each of the S steps and
  ``row_weight[S, B]`` is ``1/B_s`` for the ``B_s`` real examples of step s and 0 for the
  padding slots of a smaller last batch (see :func:`edgetl.device._head_loop.plan_steps`).
  The per-example gradient ``p - y`` is scaled by its row weight, so a padding slot adds
  exactly 0 and each step's gradient is ``(p - y) / B_s`` over its own examples. Every per-step shape is static, which
  keeps TFLite's ``WHILE`` on its path that copies only the loop variables that change.
* **Bias folded into W.** The embeddings get a constant 1 column once, before the loop,
  and ``[W; b]`` is one ``(D+1, C)`` matrix, kept transposed as ``[C, D+1]`` (the weight
  layout of Gemm/FULLY_CONNECTED, which measured fastest in both runtimes): one product
  gives the logits with the bias, one the gradient of both. The L2 pull has weight 0 on
  the bias entry.
* **Few nodes per step** (each onnxruntime node costs about a microsecond here): factors
  that scale the gradient (SGD's lr, Adam's 1 - beta1) are folded into the row weights,
  and row weights are expanded to ``[S, B, C]`` once (a broadcasting Mul cost 7x an
  elementwise one); Adam's bias corrections are per-step scalars computed once, in
  float64. onnxruntime runs 12 nodes per SGD step, 19 per Adam step.
* **Losses after the loop** (ONNX), from the per-step probabilities and column sums of
  squared weight offsets the ``Scan`` emits: no nodes per step for the cross-entropy.

Tried and measured no better (so not used): writing ``a * X + Y`` as one Gemm
``X @ (a I) + Y`` (a C x C GEMM cost more than the Mul + Add it replaces); gathering all
S x B rows before the loop (same speed as a Gather per step, and memory that grows with
the epochs); any onnxruntime graph-optimization level. ONNX uses ``Scan`` rather than ``Loop``: it slices
the per-step inputs itself, and its per-iteration overhead measured 2.0 us against
``Loop``'s 4.7 us (empty body).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgetl._quiet import native_output_silenced
from edgetl.bundle._contract import (
    ANCHOR,
    ANCHOR_ONNX,
    BIAS,
    EMBEDDING,
    L2,
    LABELS,
    LEARNING_RATE,
    LOOP_INPUTS,
    LOOP_STATE,
    LOSSES,
    M_B,
    M_W,
    MASK,
    MOMENTUM,
    OK,
    ORDER,
    PROBABILITIES,
    ROW_WEIGHT,
    STATE,
    STEP_COUNT,
    TFLITE_SIGNATURES,
    V_B,
    V_W,
    VEL_B,
    VEL_W,
    WEIGHTS,
    state_output,
)
from edgetl.bundle._head import ADAM_BETA1, ADAM_BETA2, ADAM_EPS, MASK_NEG
from edgetl.host._tf import tf

OPSET = 17
IR_VERSION = 8  # readable by older onnxruntime builds on devices

#: Signatures of :func:`head_tflite_loop` and their inputs: the head contract's.
_TFLITE_LOOP_SIGNATURES = TFLITE_SIGNATURES


def head_train_loop_onnx(embedding_size: int, max_classes: int, optimizer: str) -> bytes:
    """All steps of a step plan in one call: an ONNX ``Scan`` over the steps.

    Inputs (float32 unless noted): ``embedding[N, D]``, ``labels[N, C]`` (one-hot),
    ``order[S, B]`` (int64 example indices), ``row_weight[S, B]`` (``1/B_s`` per real
    example, 0 per padding slot), ``mask[C]``, ``W[D, C]``, ``b[C]``, ``W0[D, C]`` (the L2
    anchor), ``lr`` (> 0, the user's learning rate: the SGD graph normalizes it to
    ``lr / (mean_i ||e_i||^2 + 1)`` over the N embeddings, see
    :func:`edgetl.bundle._head.sgd_step_size`), ``l2``; SGD adds ``momentum``, ``vel_W[D, C]``, ``vel_b[C]``;
    Adam adds ``m_W``, ``m_b``, ``v_W``, ``v_b`` and ``t`` (steps taken so far).

    Outputs: ``W_out``, ``b_out``, the state with ``_out`` names (Adam's ``t_out = t + S``)
    and ``losses[S]``, each step's loss at its pre-step weights.
    Names and order: :data:`LOOP_INPUTS`, :data:`LOOP_OUTPUTS`. Opset 17, IR version 8,
    plain onnxruntime (no training build).

    Args:
        embedding_size: D.
        max_classes: C, the head's capacity.
        optimizer: ``"sgd"`` (with momentum) or ``"adam"``.

    Returns:
        The serialized model, checked with ``onnx.checker`` (full check).

    Raises:
        ValueError: ``optimizer`` is neither ``"sgd"`` nor ``"adam"``, or a size is < 1.
    """
    import onnx
    from onnx import helper as h

    if optimizer not in LOOP_STATE:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', received {optimizer!r}")
    if embedding_size < 1 or max_classes < 1:
        raise ValueError(f"embedding_size and max_classes must be >= 1, received {embedding_size}, {max_classes}")
    f, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    d, c = embedding_size, max_classes
    opt = _adam_parts(h) if optimizer == "adam" else _sgd_parts(h)
    nodes = _before_loop_nodes(h, opt.grad_factor, sgd=optimizer == "sgd") + opt.before
    nodes.append(_scan_node(h, d, c, opt))
    # After the loop: weights and state in their own layout and units, and the losses.
    nodes += _split_t(h, "w_final", state_output(WEIGHTS), state_output(BIAS)) + opt.after + _loss_nodes(h)
    shapes = _io_shapes(d, c)
    graph = h.make_graph(
        nodes,
        f"edgetl_head_train_loop_{optimizer}",
        [h.make_tensor_value_info(x, i64 if x == ORDER else f, shapes[x]) for x in LOOP_INPUTS[optimizer]],
        [h.make_tensor_value_info(state_output(s), f, shapes[s]) for s in STATE[optimizer]]
        + [h.make_tensor_value_info(LOSSES, f, ["S"])],
        initializer=_initializers(h, d, c) + opt.init,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], producer_name="edgetl")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _io_shapes(d: int, c: int) -> dict[str, list[Any]]:
    """Shapes of the loop graph's inputs; an output ``X_out`` has the shape of ``X``."""
    return {
        EMBEDDING: ["N", d],
        LABELS: ["N", c],
        ORDER: ["S", "B"],
        ROW_WEIGHT: ["S", "B"],
        MASK: [c],
        WEIGHTS: [d, c],
        BIAS: [c],
        ANCHOR_ONNX: [d, c],
        LEARNING_RATE: [],
        L2: [],
        MOMENTUM: [],
        VEL_W: [d, c],
        VEL_B: [c],
        M_W: [d, c],
        M_B: [c],
        V_W: [d, c],
        V_B: [c],
        STEP_COUNT: [],
    }


@dataclass(frozen=True)
class _LoopParts:
    """What one optimizer adds to the loop graph around the shared gradient step.

    ``state`` names the optimizer's loop variables besides ``w`` (all ``[C, D+1]``): ``X`` in
    the body, with ``X_init`` (made by ``before``) going in, ``X_new`` out of a step and
    ``X_final`` out of the loop (turned into the ``_out`` outputs by ``after``).
    """

    grad_factor: str  # folded into the row weights and the L2 weights
    init: list[Any]  # initializers (after the shared ones)
    before: list[Any]  # nodes before the loop
    state: tuple[str, ...]
    scan: list[tuple[str, str, list[Any]]]  # per-step inputs: (name in the body, source, per-step shape)
    body: list[Any]  # step nodes after the shared ones, ending in X_new for each loop variable
    after: list[Any]  # nodes after the loop


def _const(h: Any, name: str, value: Any, dtype: int | None = None) -> Any:
    """An initializer; float32 unless ``dtype`` (a ``TensorProto`` type) says otherwise."""
    from onnx import TensorProto

    arr = np.asarray(value)
    return h.make_tensor(name, TensorProto.FLOAT if dtype is None else dtype, list(arr.shape), arr.ravel().tolist())


def _aug_t_nodes(h: Any, w: str, bias: str, out: str) -> list[Any]:
    """``W[D, C]``, ``b[C]`` -> ``[W; b]^T`` of shape ``[C, D+1]``."""
    return [
        h.make_node("Unsqueeze", [bias, "ax0"], [out + "_row"]),
        h.make_node("Concat", [w, out + "_row"], [out + "_aug"], axis=0),
        h.make_node("Transpose", [out + "_aug"], [out], perm=[1, 0]),
    ]


def _split_t(h: Any, src: str, w: str, bias: str) -> list[Any]:
    """``[C, D+1]`` -> ``W[D, C]`` and ``b[C]``."""
    return [
        h.make_node("Slice", [src, "start0", "end_d", "ax1"], [w + "_t"]),
        h.make_node("Transpose", [w + "_t"], [w], perm=[1, 0]),
        h.make_node("Gather", [src, "col_d"], [bias], axis=1),
    ]


def _initializers(h: Any, d: int, c: int) -> list[Any]:
    """The constants both optimizers use."""
    from onnx import TensorProto

    i64 = TensorProto.INT64
    return [
        _const(h, "one", 1.0),
        _const(h, "neg_big", MASK_NEG),
        _const(h, "tiny", 1e-12),
        _const(h, "pad_col", [0, 0, 0, 1], i64),  # append one column
        _const(h, "w_cols", np.r_[np.ones(d), 0.0].reshape(1, d + 1)),  # L2 weight: 1 for W, 0 for b
        _const(h, "cd_shape", [c, d + 1], i64),
        _const(h, "half_w_cols", np.r_[np.full(d, 0.5), 0.0]),
        _const(h, "ax0", [0], i64),
        _const(h, "ax1", [1], i64),
        _const(h, "ax2", [2], i64),
        _const(h, "ax12", [1, 2], i64),
        _const(h, "col_d", d, i64),
        _const(h, "start0", [0], i64),
        _const(h, "end_d", [d], i64),
    ]


def _before_loop_nodes(h: Any, grad_factor: str, *, sgd: bool) -> list[Any]:
    """Once per call, before the loop: inputs in the loop's layout, row weights scaled by ``grad_factor``
    (SGD: the normalized step ``lr_step``, computed here)."""
    # SGD's step (edgetl.bundle._head.sgd_step_size): lr / (mean_i ||e_i||^2 + 1), and the 1
    # is the bias input, so the mean squared norm of the padded rows is the denominator.
    sgd_step = [
        h.make_node("ReduceSumSquare", ["emb_aug"], ["row_sq"], axes=[1], keepdims=0),
        h.make_node("ReduceMean", ["row_sq"], ["mean_row_sq"], keepdims=0),
        h.make_node("Div", [LEARNING_RATE, "mean_row_sq"], ["lr_step"]),
    ]
    return [
        h.make_node("Pad", [EMBEDDING, "pad_col", "one"], ["emb_aug"]),  # [N, D+1]: the bias input 1
        *(sgd_step if sgd else []),
        h.make_node("Gather", [LABELS, ORDER], ["y_g"], axis=0),  # [S, B, C]
        h.make_node("Unsqueeze", [ROW_WEIGHT, "ax2"], ["rw3"]),  # [S, B, 1]
        h.make_node("Mul", ["y_g", "rw3"], ["y_rw"]),  # for the losses
        h.make_node("Shape", ["y_g"], ["y_shape"]),
        h.make_node("Sub", ["one", MASK], ["inactive"]),
        h.make_node("Mul", ["inactive", "neg_big"], ["mask_bias"]),
        # The anchor's bias entry is 0: any value does, its L2 weight is 0.
        h.make_node("Transpose", [ANCHOR_ONNX], ["w0_top"], perm=[1, 0]),
        h.make_node("Pad", ["w0_top", "pad_col"], ["w0_t"]),
        *_aug_t_nodes(h, WEIGHTS, BIAS, "w_init"),
        h.make_node("Mul", ["rw3", grad_factor], ["rw_step"]),
        h.make_node("Expand", ["rw_step", "y_shape"], ["rw_steps"]),  # [S, B, C]
        h.make_node("Mul", ["y_g", "rw_steps"], ["yrw_steps"]),
        h.make_node("Mul", [L2, grad_factor], ["l2_factor"]),
        h.make_node("Expand", ["w_cols", "cd_shape"], ["w_cols_full"]),  # [C, D+1], once
        h.make_node("Mul", ["w_cols_full", "l2_factor"], ["l2_step"]),
    ]


def _step_nodes(h: Any) -> list[Any]:
    """The start of every step: the scaled logit gradient ``g_logits`` and the L2 gradient ``g_l2``."""
    return [
        h.make_node("Gather", ["emb_aug", "order_s"], ["e_s"], axis=0),  # [B, D+1]
        h.make_node("Gemm", ["e_s", "w", "mask_bias"], ["logits"], transB=1),  # [B, C]
        h.make_node("Softmax", ["logits"], ["p"], axis=-1),  # also a Scan output, for the losses
        h.make_node("Mul", ["p", "rw_s"], ["p_rw"]),
        h.make_node("Sub", ["p_rw", "yrw_s"], ["g_logits"]),  # factor * (p - y) / B_s
        h.make_node("Sub", ["w", "w0_t"], ["dw"]),
        h.make_node("Mul", ["dw", "l2_step"], ["g_l2"]),
        # Per-column squares of the offset, a Scan output for the L2 loss: [D+1] per step
        # (emitting dw itself, [C, D+1] per step, ran as fast but holds S x C x (D+1) floats).
        h.make_node("ReduceSumSquare", ["dw"], ["dw_sq"], axes=[0], keepdims=0),
    ]


def _scan_node(h: Any, d: int, c: int, opt: _LoopParts) -> Any:
    """The ``Scan`` over the steps: loop variables ``w`` and ``opt.state``, per-step probabilities and L2 offsets."""
    from onnx import TensorProto

    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    state = ("w", *opt.state)
    # Each step gathers its rows inside the loop (as fast as gathering all S x B rows
    # before it, measured, and memory stays O(N D) instead of growing with the epochs).
    scan = [("order_s", ORDER, ["B"]), ("rw_s", "rw_steps", ["B", c]), ("yrw_s", "yrw_steps", ["B", c])]
    scan += opt.scan
    body = h.make_graph(
        _step_nodes(h) + opt.body,
        "step",
        [h.make_tensor_value_info(name, f, [c, d + 1]) for name in state]
        + [h.make_tensor_value_info(name, i64 if name == "order_s" else f, shape) for name, _, shape in scan],
        [h.make_tensor_value_info(f"{name}_new", f, [c, d + 1]) for name in state]
        + [h.make_tensor_value_info("p", f, ["B", c]), h.make_tensor_value_info("dw_sq", f, [d + 1])],
    )
    return h.make_node(
        "Scan",
        [f"{name}_init" for name in state] + [src for _, src, _ in scan],
        [f"{name}_final" for name in state] + ["p_all", "col_sq"],
        body=body,
        num_scan_inputs=len(scan),
    )


def _loss_nodes(h: Any) -> list[Any]:
    """After the loop: ``losses[S]`` from the per-step probabilities and column sums of squared offsets."""
    return [
        h.make_node("Clip", ["p_all", "tiny", "one"], ["p_clip"]),
        h.make_node("Log", ["p_clip"], ["logp"]),
        h.make_node("Mul", ["y_rw", "logp"], ["ylogp"]),
        h.make_node("ReduceSum", ["ylogp", "ax12"], ["ll"], keepdims=0),  # -CE, averaged by the row weights
        h.make_node("Mul", ["half_w_cols", L2], ["half_l2"]),  # [D+1], bias entry 0
        h.make_node("MatMul", ["col_sq", "half_l2"], ["l2_term"]),  # [S]
        h.make_node("Sub", ["l2_term", "ll"], [LOSSES]),
    ]


def _sgd_parts(h: Any) -> _LoopParts:
    """SGD with momentum; the velocity is kept as ``lr_step * vel``, so the row weights carry ``lr_step``
    (the normalized step, see :func:`_before_loop_nodes`)."""
    return _LoopParts(
        grad_factor="lr_step",
        init=[],
        before=_aug_t_nodes(h, VEL_W, VEL_B, "vel_raw") + [h.make_node("Mul", ["vel_raw", "lr_step"], ["vel_init"])],
        state=("vel",),
        scan=[],
        body=[
            h.make_node("Mul", ["vel", MOMENTUM], ["vel_decay"]),
            h.make_node("Add", ["vel_decay", "g_l2"], ["vel_part"]),
            h.make_node("Gemm", ["g_logits", "e_s", "vel_part"], ["vel_new"], transA=1),  # lr_step * vel_new
            h.make_node("Sub", ["w", "vel_new"], ["w_new"]),
        ],
        after=[h.make_node("Div", ["vel_final", "lr_step"], ["vel_back"])]
        + _split_t(h, "vel_back", state_output(VEL_W), state_output(VEL_B)),
    )


def _adam_parts(h: Any) -> _LoopParts:
    """Adam; the row weights carry ``1 - beta1``, and the bias corrections are per-step scalars."""
    from onnx import TensorProto

    f64 = TensorProto.DOUBLE
    init = [
        _const(h, "omb1", 1.0 - ADAM_BETA1),
        _const(h, "eps", ADAM_EPS, f64),
        _const(h, "one_d", 1.0, f64),
        _const(h, "beta1_d", ADAM_BETA1, f64),
        _const(h, "beta2_d", ADAM_BETA2, f64),
        _const(h, "sqrt_omb2_over_omb1", np.sqrt(1.0 - ADAM_BETA2) / (1.0 - ADAM_BETA1), f64),
        _const(h, "beta1", ADAM_BETA1),
        _const(h, "beta2", ADAM_BETA2),
        _const(h, "v_scale", (1.0 - ADAM_BETA1) ** 2 / (1.0 - ADAM_BETA2)),
    ]
    # m is kept in its own units; v as v' = v (1-beta1)^2 / (1-beta2), so that with
    # g1 = (1 - beta1) g from the GEMM, v'_new = beta2 v' + g1^2 needs no extra scaling.
    before = (
        _adam_schedule_nodes(h)
        + _aug_t_nodes(h, M_W, M_B, "m_init")
        + _aug_t_nodes(h, V_W, V_B, "v_raw")
        + [h.make_node("Mul", ["v_raw", "v_scale"], ["v_init"])]
    )
    body = [
        h.make_node("Gemm", ["g_logits", "e_s", "g_l2"], ["g1"], transA=1),  # (1 - beta1) g
        h.make_node("Mul", ["m", "beta1"], ["m_decay"]),
        h.make_node("Add", ["m_decay", "g1"], ["m_new"]),
        h.make_node("Mul", ["g1", "g1"], ["g1_sq"]),
        h.make_node("Mul", ["v", "beta2"], ["v_decay"]),
        h.make_node("Add", ["v_decay", "g1_sq"], ["v_new"]),
        h.make_node("Sqrt", ["v_new"], ["v_root"]),
        h.make_node("Add", ["v_root", "eps_s"], ["den"]),
        h.make_node("Div", ["m_new", "den"], ["ratio"]),
        h.make_node("Mul", ["ratio", "lam_s"], ["step"]),
        h.make_node("Sub", ["w", "step"], ["w_new"]),
    ]
    after = (
        _split_t(h, "m_final", state_output(M_W), state_output(M_B))
        + [h.make_node("Div", ["v_final", "v_scale"], ["v_back"])]
        + _split_t(h, "v_back", state_output(V_W), state_output(V_B))
        + [h.make_node("Add", [STEP_COUNT, "steps_f"], [state_output(STEP_COUNT)])]
    )
    scan = [("eps_s", "eps_steps", []), ("lam_s", "lam_steps", [])]
    return _LoopParts("omb1", init, before, ("m", "v"), scan, body, after)


def _adam_schedule_nodes(h: Any) -> list[Any]:
    """Per-step Adam scalars, in float64 (once per call, not per step).

    With ``m`` in its own units and ``v' = v (1-b1)^2/(1-b2)``, the reference update
    ``lr (m/bc1) / (sqrt(v/bc2) + eps)`` is ``lam * m / (sqrt(v') + eps_s)`` with
    ``kappa = sqrt((1-b2)/bc2) / (1-b1)``, ``lam = lr / (bc1 kappa)``, ``eps_s = eps / kappa``.
    float64 because ``1 - 0.999^t`` loses 5 digits to cancellation in float32 for small t.
    """
    import onnx

    f, f64 = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE
    return [
        h.make_node("Shape", [ORDER], ["order_shape"]),
        h.make_node("Gather", ["order_shape", "ax0"], ["steps_1"], axis=0),
        h.make_node("Cast", ["steps_1"], ["steps_d1"], to=f64),
        h.make_node("Squeeze", ["steps_d1", "ax0"], ["steps_d"]),
        h.make_node("Cast", ["steps_d"], ["steps_f"], to=f),
        h.make_node("Cast", [STEP_COUNT], ["t_d"], to=f64),
        h.make_node("Add", ["t_d", "one_d"], ["t_first"]),
        h.make_node("Add", ["t_d", "steps_d"], ["t_last"]),
        h.make_node("Add", ["t_last", "one_d"], ["t_limit"]),
        h.make_node("Range", ["t_first", "t_limit", "one_d"], ["t_steps"]),  # t+1 .. t+S
        h.make_node("Pow", ["beta1_d", "t_steps"], ["b1t"]),
        h.make_node("Pow", ["beta2_d", "t_steps"], ["b2t"]),
        h.make_node("Sub", ["one_d", "b1t"], ["bc1"]),
        h.make_node("Sub", ["one_d", "b2t"], ["bc2"]),
        h.make_node("Sqrt", ["bc2"], ["bc2_root"]),
        h.make_node("Div", ["sqrt_omb2_over_omb1", "bc2_root"], ["kappa"]),
        h.make_node("Div", ["eps", "kappa"], ["eps_d"]),
        h.make_node("Cast", ["eps_d"], ["eps_steps"], to=f),
        h.make_node("Mul", ["bc1", "kappa"], ["lam_den"]),
        h.make_node("Cast", [LEARNING_RATE], ["lr_d"], to=f64),
        h.make_node("Div", ["lr_d", "lam_den"], ["lam_d"]),
        h.make_node("Cast", ["lam_d"], ["lam_steps"], to=f),
    ]


def head_tflite_loop(W: np.ndarray, b: np.ndarray, mask: np.ndarray) -> bytes:
    """The head as a TFLite model (builtin ops only) that can also train many steps per invoke.

    This is the bundle's ``head.tflite``. Signatures (all tensors float32 unless noted;
    names from :data:`edgetl.bundle._head.TFLITE_SIGNATURES`):

        infer(embedding[B,D]) -> probabilities[B,C]
        get_weights(unused) -> W, b, mask, anchor   (``unused`` is ignored: see the head contract)
        set_weights(W, b, mask, anchor) -> ok   (also resets the optimizer state)
        train_steps(embedding[N,D], labels[N,C], order[S,B] int64, row_weight[S,B], lr, l2,
                    momentum, optimizer) -> losses[S]

    ``lr`` is the user's learning rate; for SGD the graph takes
    ``lr / (mean_i ||e_i||^2 + 1)`` over the N embeddings as its step (as the ONNX graph).

    ``train_steps`` runs the S steps of a step plan (see :func:`head_train_loop_onnx` for
    ``order`` and ``row_weight``) in one ``WHILE`` loop (S = 1: one step); Adam's bias
    corrections are computed without float32's cancellation (:func:`_one_minus_pow`).
    ``optimizer`` <= 0.5 is SGD with momentum, > 0.5 Adam; it selects one of two loops with
    an ``IF`` (a builtin op), so each step runs one optimizer's update.

    The loop keeps ``[W; b]^T``, the optimizer state and the losses as loop variables (read
    from the resource variables before the loop, assigned after it); its inputs are the
    N embeddings, not the S x B gathered rows, so memory does not grow with the epochs, and
    every tensor in the body has a static shape, which keeps TFLite's ``WHILE`` on its path
    that copies only the loop variables that change (loop invariants pass by pointer).

    Args:
        W, b, mask: the head's initial weights ``[D, C]``, ``[C]`` and active-class mask
            (the anchor starts as W; ``set_weights`` replaces all four).

    Returns:
        The serialized TFLite model, converted with ``TFLITE_BUILTINS`` only and resource
        variables enabled (runs on ai-edge-litert, which has no Flex delegate).
    """
    t = tf()
    head = _head_module(t, W, b, mask)
    fns = [getattr(head, name).get_concrete_function() for name in _TFLITE_LOOP_SIGNATURES]
    conv = t.lite.TFLiteConverter.from_concrete_functions(fns, head)
    conv.target_spec.supported_ops = [t.lite.OpsSet.TFLITE_BUILTINS]
    conv.experimental_enable_resource_variables = True
    with native_output_silenced():  # the converter prints from C++
        return conv.convert()


def _head_module(t: Any, W: np.ndarray, b: np.ndarray, mask: np.ndarray) -> Any:
    """A ``tf.Module`` with :class:`_LoopHead`'s signature methods, each a ``tf.function`` of its input signature."""
    d, c = W.shape
    shapes = {
        EMBEDDING: [None, d],
        LABELS: [None, c],
        ORDER: [None, None],
        ROW_WEIGHT: [None, None],
        WEIGHTS: [d, c],
        BIAS: [c],
        MASK: [c],
        ANCHOR: [d, c],
    }  # the rest are scalars
    signatures = {
        name: t.function(
            getattr(_LoopHead, name),
            input_signature=[
                t.TensorSpec(shapes.get(x, []), t.int64 if x == ORDER else t.float32, name=x) for x in inputs
            ],
        )
        for name, inputs in _TFLITE_LOOP_SIGNATURES.items()
    }
    return type("Head", (_LoopHead, t.Module), signatures)(W, b, mask)


class _LoopHead:
    """The variables and signature bodies of :func:`head_tflite_loop`'s model (see :func:`_head_module`)."""

    def __init__(self, W: np.ndarray, b: np.ndarray, mask: np.ndarray) -> None:
        t = tf()
        super().__init__()
        self.W = t.Variable(W, dtype=t.float32)
        self.b = t.Variable(b, dtype=t.float32)
        self.mask = t.Variable(mask, dtype=t.float32)
        self.anchor = t.Variable(W, dtype=t.float32)
        zeros_w, zeros_b = np.zeros_like(W, dtype=np.float32), np.zeros_like(b, dtype=np.float32)
        self.vel_W, self.vel_b = t.Variable(zeros_w), t.Variable(zeros_b)
        self.m_W, self.m_b = t.Variable(zeros_w), t.Variable(zeros_b)
        self.v_W, self.v_b = t.Variable(zeros_w), t.Variable(zeros_b)
        self.t = t.Variable(0.0)  # Adam's step count

    def _probs(self, e: Any) -> Any:
        t = tf()
        logits = t.matmul(e, self.W) + self.b + (1.0 - self.mask) * MASK_NEG
        return t.nn.softmax(logits)

    def infer(self, embedding: Any) -> Any:
        return {PROBABILITIES: self._probs(embedding)}

    def train_steps(
        self,
        embedding: Any,
        labels: Any,
        order: Any,
        row_weight: Any,
        lr: Any,
        l2: Any,
        momentum: Any,
        optimizer: Any,
    ) -> Any:
        t = tf()
        d = self.W.shape[0]
        w_cols = np.r_[np.ones(d), 0.0].astype(np.float32).reshape(1, d + 1)  # L2 pulls W, not b
        emb = t.concat([embedding, t.ones_like(embedding[:, :1])], axis=1)  # [N, D+1]: the bias input 1
        steps = t.shape(order, out_type=t.int32)[0]
        plan = {
            "emb": emb,
            "y": labels,
            "steps_order": order,
            "rw": t.expand_dims(row_weight, -1),  # [S, B, 1]
            "mask_bias": (1.0 - self.mask) * MASK_NEG,
            # [W; b]^T, the layout FULLY_CONNECTED takes its weights in; the anchor's bias
            # entry is b, but its L2 weight is 0 (the pull is on W only).
            "w0": _aug_t(t, self.anchor, self.b),
            "l2_cols": l2 * w_cols,  # [1, D+1]
            "steps": steps,
            "step_ids": t.range(steps),  # outside the body: RANGE's output shape is dynamic
        }
        w = _aug_t(t, self.W, self.b)
        losses = t.cond(
            optimizer > 0.5, lambda: self._adam_loop(plan, w, lr), lambda: self._sgd_loop(plan, w, lr, momentum)
        )
        return {LOSSES: losses}

    def _step_grad(self, plan: dict[str, Any], i: Any, w: Any) -> tuple[Any, Any]:
        """Gradient of ``[W; b]^T`` at step i, and the step's loss at w."""
        t = tf()
        idx = t.gather(plan["steps_order"], i)
        e = t.gather(plan["emb"], idx)  # [B, D+1]
        rw = t.gather(plan["rw"], i)  # [B, 1]
        y_rw = t.gather(plan["y"], idx) * rw
        # [W; b]^T is FULLY_CONNECTED's weight layout: the logits need no transpose.
        p = t.nn.softmax(t.matmul(e, w, transpose_b=True) + plan["mask_bias"])  # [B, C]
        g_logits = p * rw - y_rw
        dw = w - plan["w0"]
        l2_dw = plan["l2_cols"] * dw
        # E^T g as FULLY_CONNECTED(E^T, g^T), transposed back: 25% faster in LiteRT (XNNPACK)
        # than BATCH_MATMUL(g, E, adj_x) or FULLY_CONNECTED(g^T, E^T), measured at D=256.
        grad = t.transpose(t.matmul(t.transpose(e), t.transpose(g_logits), transpose_b=True)) + l2_dw  # [C, D+1]
        loss = 0.5 * t.reduce_sum(l2_dw * dw) - t.reduce_sum(y_rw * t.math.log(t.clip_by_value(p, 1e-12, 1.0)))
        return grad, loss

    def _store(self, w: Any, w_var: Any, b_var: Any) -> None:
        """``[C, D+1]`` back into the ``W[D, C]`` and ``b[C]`` variables."""
        t = tf()
        d = self.W.shape[0]
        w_var.assign(t.transpose(w[:, :d]))
        b_var.assign(w[:, d])

    def _sgd_loop(self, plan: dict[str, Any], w: Any, lr: Any, momentum: Any) -> Any:
        t = tf()
        # SGD's step (edgetl.bundle._head.sgd_step_size): lr / (mean_i ||e_i||^2 + 1); the
        # padded rows end in the bias input 1, so their mean squared norm is the denominator.
        lr = lr / t.reduce_mean(t.reduce_sum(plan["emb"] * plan["emb"], axis=1))

        def body(i: Any, w: Any, vel: Any, losses: Any) -> Any:
            grad, loss = self._step_grad(plan, i, w)
            vel = momentum * vel + grad
            return i + 1, w - lr * vel, vel, t.where(plan["step_ids"] == i, loss, losses)

        start = (t.constant(0), w, _aug_t(t, self.vel_W, self.vel_b), t.zeros([plan["steps"]], t.float32))
        _, w, vel, losses = t.while_loop(lambda i, *_: i < plan["steps"], body, start)
        self._store(w, self.W, self.b)
        self._store(vel, self.vel_W, self.vel_b)
        return losses

    def _adam_loop(self, plan: dict[str, Any], w: Any, lr: Any) -> Any:
        t = tf()
        step_t = self.t + 1.0 + t.cast(plan["step_ids"], t.float32)
        # lr / bias corrections per step, before the loop; 1 - beta^t without float32's
        # cancellation (see _one_minus_pow), so they match the float64 reference.
        lr_steps = lr / _one_minus_pow(t, ADAM_BETA1, step_t)
        bc2_steps = _one_minus_pow(t, ADAM_BETA2, step_t)

        def body(i: Any, w: Any, m: Any, v: Any, losses: Any) -> Any:
            grad, loss = self._step_grad(plan, i, w)
            m = ADAM_BETA1 * m + (1.0 - ADAM_BETA1) * grad
            v = ADAM_BETA2 * v + (1.0 - ADAM_BETA2) * grad * grad
            w = w - t.gather(lr_steps, i) * m / (t.sqrt(v / t.gather(bc2_steps, i)) + ADAM_EPS)
            return i + 1, w, m, v, t.where(plan["step_ids"] == i, loss, losses)

        start = (
            t.constant(0),
            w,
            _aug_t(t, self.m_W, self.m_b),
            _aug_t(t, self.v_W, self.v_b),
            t.zeros([plan["steps"]], t.float32),
        )
        _, w, m, v, losses = t.while_loop(lambda i, *_: i < plan["steps"], body, start)
        self._store(w, self.W, self.b)
        self._store(m, self.m_W, self.m_b)
        self._store(v, self.v_W, self.v_b)
        self.t.assign(self.t + t.cast(plan["steps"], t.float32))
        return losses

    def get_weights(self, unused: Any) -> Any:  # unused: see edgetl.bundle._head.TFLITE_SIGNATURES
        t = tf()
        return {
            WEIGHTS: t.identity(self.W),
            BIAS: t.identity(self.b),
            MASK: t.identity(self.mask),
            ANCHOR: t.identity(self.anchor),
        }

    def set_weights(self, W: Any, b: Any, mask: Any, anchor: Any) -> Any:
        t = tf()
        for var, value in ((self.W, W), (self.b, b), (self.mask, mask), (self.anchor, anchor)):
            var.assign(value)
        for var in (self.vel_W, self.vel_b, self.m_W, self.m_b, self.v_W, self.v_b):
            var.assign(t.zeros_like(var))
        self.t.assign(0.0)
        return {OK: t.constant(1.0)}


def _aug_t(t: Any, w: Any, b: Any) -> Any:
    """``W[D, C]``, ``b[C]`` -> ``[W; b]^T`` of shape ``[C, D+1]``."""
    return t.concat([t.transpose(w), b[:, None]], axis=1)


def _one_minus_pow(t: Any, beta: float, steps: Any) -> Any:
    """``1 - beta**steps`` in float32 without cancellation (Adam's bias correction).

    ``1 - pow(0.999, 1)`` in float32 keeps 3 of 7 digits: float32(0.999) is off by 1e-8,
    1e-5 of the result. Instead ``-expm1(steps * ln(beta))`` with ``ln(beta)`` from float64
    and expm1 as its Taylor series where ``|x| <= 0.5`` (12 terms: error < 1e-12), else
    ``exp(x) - 1`` (no cancellation there). TFLite has no EXPM1 builtin.
    """
    x = steps * float(np.log(beta))
    series = t.ones_like(x)
    for k in range(12, 1, -1):  # Horner: x (1 + x/2 (1 + x/3 (1 + ...)))
        series = 1.0 + series * x / float(k)
    small = t.abs(x) <= 0.5
    expm1 = t.where(small, x * series, t.exp(t.minimum(x, 0.0)) - 1.0)
    return -expm1
