"""Head training loops (one runtime call for a whole step plan) against the float64 numpy
`reference_step`, one step at a time.

Tolerances, absolute, on weights and state of scale ~1 that training moves by 0.1-1:
* loop vs float64 reference: 2e-6. Both loops compute in float32; observed max 5e-7 (on
  SGD's velocity, which the ONNX loop keeps as lr * vel: dividing by lr = 0.05 at the end
  scales its rounding by 20) and 1e-7 on the weights, after 12-27 steps: rounding of
  ~1e-7 per step accumulates slowly (SGD with momentum and Adam damp these errors).
* losses: 2e-6 (logs of float32 probabilities; observed 2e-7).
"""

from __future__ import annotations

import numpy as np
import pytest

from edgetl.bundle._contract import LOOP_INPUTS, LOOP_OUTPUTS
from edgetl.bundle._head import initial_state, masked_softmax, reference_step, sgd_step_size
from edgetl.device._head import HeadState, TrainSettings, batches, effective_learning_rate
from edgetl.device._head_loop import LiteRTLoopHeadTrainer, OnnxLoopHeadTrainer, plan_steps
from edgetl.errors import InputError
from edgetl.host._head_graphs import head_infer_onnx
from edgetl.host._head_loop_graphs import head_tflite_loop, head_train_loop_onnx

D, C, N = 6, 5, 11  # 11 examples in batches of 4: every epoch ends with a batch of 3
MASK = np.array([1, 1, 1, 0, 0], np.float32)  # classes 3 and 4 inactive
LR, L2, MU = 0.05, 0.01, 0.9
OPTIMIZERS = ["sgd", "adam"]
TOL_REF, TOL_LOSS = 2e-6, 2e-6


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(N, D)).astype(np.float32)
    onehot = np.eye(C, dtype=np.float32)[rng.integers(0, 3, N)]
    W = (rng.normal(size=(D, C)) * 0.3).astype(np.float32)
    W[:, 3:] = 0.0  # inactive classes: not trained yet
    b = (rng.normal(size=C) * 0.3).astype(np.float32)
    b[3:] = 0.0
    anchor = (W + rng.normal(size=(D, C)) * 0.2).astype(np.float32)
    anchor[:, 3:] = 0.0
    return emb, onehot, HeadState(W, b, MASK.copy(), anchor, ("a", "b", "c"))


@pytest.fixture(scope="module")
def onnx_models():
    return {
        "loop": {opt: head_train_loop_onnx(D, C, opt) for opt in OPTIMIZERS},
        "infer": head_infer_onnx(D, C),
    }


@pytest.fixture(scope="module")
def tflite_models(data):
    _, _, head = data
    return {"loop": head_tflite_loop(head.W, head.b, head.mask)}


def session(model):
    import onnxruntime as ort

    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def nonzero_state(head, optimizer, seed=5):
    """Optimizer state as if training had been under way (moments, velocity, t > 0)."""
    rng = np.random.default_rng(seed)
    state = initial_state(head.W, head.b, optimizer)
    for k in state:
        if k not in ("W", "b", "t"):
            state[k] = (np.abs if k.startswith("v_") else np.asarray)(rng.normal(size=state[k].shape) * 0.05).astype(
                np.float32
            )
    if optimizer == "adam":
        state["t"] = np.array(3.0, np.float32)
    return state


def run_loop_onnx(model, head, emb, onehot, order, row_weight, optimizer, state):
    sess = session(model)
    feed = {
        "embedding": emb,
        "labels": onehot,
        "order": order,
        "row_weight": row_weight,
        "mask": head.mask,
        "W0": head.anchor,
    }
    feed.update(lr=np.array(LR, np.float32), l2=np.array(L2, np.float32), **state)
    if optimizer == "sgd":
        feed["momentum"] = np.array(MU, np.float32)
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    return {k: out[f"{k}_out"] for k in state}, out["losses"]


def run_reference(head, emb, onehot, steps, optimizer, state, lr=None):
    """Step by step in float64; ``lr`` None: the step the graphs take when fed LR (SGD
    normalizes it over all the embeddings fed, see edgetl.bundle._head.sgd_step_size)."""
    if lr is None:
        lr = sgd_step_size(LR, emb) if optimizer == "sgd" else LR
    losses = []
    for idx in steps:
        state, loss = reference_step(
            state, emb[idx], onehot[idx], head.mask, head.anchor, optimizer=optimizer, lr=lr, l2=L2, momentum=MU
        )
        losses.append(loss)
    return state, np.array(losses)


def assert_state_close(got, want, atol, moved_from=None):
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=atol, err_msg=k)
    if moved_from is not None:  # the comparison means something only if training moved the weights
        assert np.abs(want["W"] - moved_from["W"]).max() > 1e3 * atol


# --- step plan -------------------------------------------------------------------------


def test_plan_steps_is_batches_as_arrays_with_an_uneven_last_batch():
    settings = TrainSettings(epochs=3, batch_size=4, seed=7)
    order, row_weight = plan_steps(N, settings)
    steps = batches(N, settings)
    assert order.shape == row_weight.shape == (len(steps), 4) == (9, 4)
    assert order.dtype == np.int64 and row_weight.dtype == np.float32
    for s, idx in enumerate(steps):
        np.testing.assert_array_equal(order[s, : len(idx)], idx)
        np.testing.assert_allclose(row_weight[s, : len(idx)], 1.0 / len(idx))
        assert np.all(row_weight[s, len(idx) :] == 0) and np.all((order[s] >= 0) & (order[s] < N))
    assert sorted(len(i) for i in steps)[:3] == [3, 3, 3]  # the uneven last batch of each epoch
    # Fewer examples than the batch size: one full-width step per epoch.
    order, row_weight = plan_steps(3, settings)
    assert order.shape == (3, 3) and np.allclose(row_weight, 1 / 3)


# --- ONNX ------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_onnx_loop_equals_float64_reference(data, onnx_models, optimizer):
    emb, onehot, head = data
    settings = TrainSettings(epochs=3, batch_size=4, optimizer=optimizer)
    order, row_weight = plan_steps(N, settings)
    steps = batches(N, settings)
    start = nonzero_state(head, optimizer)
    got, losses = run_loop_onnx(onnx_models["loop"][optimizer], head, emb, onehot, order, row_weight, optimizer, start)
    ref, ref_losses = run_reference(head, emb, onehot, steps, optimizer, dict(start))
    assert_state_close(got, ref, TOL_REF, moved_from=start)
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=TOL_LOSS)
    if optimizer == "adam":
        assert float(got["t"]) == 3.0 + len(steps)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_onnx_loop_runs_every_step_not_just_one(data, onnx_models, optimizer):
    emb, onehot, head = data
    settings = TrainSettings(epochs=2, batch_size=4, optimizer=optimizer)
    order, row_weight = plan_steps(N, settings)
    steps = batches(N, settings)
    start = nonzero_state(head, optimizer)
    got, losses = run_loop_onnx(onnx_models["loop"][optimizer], head, emb, onehot, order, row_weight, optimizer, start)
    all_steps, _ = run_reference(head, emb, onehot, steps, optimizer, dict(start))
    one_step, _ = run_reference(head, emb, onehot, steps[:1], optimizer, dict(start))
    assert np.abs(got["W"] - all_steps["W"]).max() < TOL_REF
    assert np.abs(got["W"] - one_step["W"]).max() > 1e3 * TOL_REF
    assert losses.shape == (len(steps),) and len(set(np.round(losses, 6))) == len(steps)
    # A plan of one step is that one step.
    got1, _ = run_loop_onnx(
        onnx_models["loop"][optimizer], head, emb, onehot, order[:1], row_weight[:1], optimizer, start
    )
    assert_state_close(got1, one_step, TOL_REF)


def test_onnx_loop_graphs_are_opset17_ir8_checked_and_named(onnx_models):
    import onnx

    for optimizer, model in onnx_models["loop"].items():
        proto = onnx.load_from_string(model)
        onnx.checker.check_model(proto, full_check=True)
        assert proto.ir_version == 8 and [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
        assert tuple(i.name for i in proto.graph.input) == LOOP_INPUTS[optimizer]
        assert tuple(o.name for o in proto.graph.output) == LOOP_OUTPUTS[optimizer]
        assert [n.op_type for n in proto.graph.node].count("Scan") == 1
    with pytest.raises(ValueError, match="optimizer must be 'sgd' or 'adam', received 'rmsprop'"):
        head_train_loop_onnx(D, C, "rmsprop")


# --- TFLite ----------------------------------------------------------------------------


def interpreter(model):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=model)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_tflite_train_steps_equals_reference_from_a_running_state(data, tflite_models, optimizer):
    """A 2-step plan (so the optimizer state is no longer zero), then a 3-epoch plan: the
    interpreter keeps the state between calls, as the reference does between steps."""
    emb, onehot, head = data
    settings = TrainSettings(epochs=3, batch_size=4, optimizer=optimizer, seed=1)
    order, row_weight = plan_steps(N, settings)
    steps = batches(N, settings)
    warmup = [np.arange(0, 4), np.arange(4, 8)]
    hyper = {
        "lr": np.float32(LR),
        "l2": np.float32(L2),
        "momentum": np.float32(MU),
        "optimizer": np.float32(optimizer == "adam"),
    }
    it = interpreter(tflite_models["loop"])
    it.get_signature_runner("set_weights")(**head.arrays())
    train_steps = it.get_signature_runner("train_steps")
    plan = dict(order=np.stack(warmup).astype(np.int64), row_weight=np.full((2, 4), 0.25, np.float32))
    train_steps(embedding=emb, labels=onehot, **plan, **hyper)
    losses = train_steps(embedding=emb, labels=onehot, order=order, row_weight=row_weight, **hyper)["losses"]
    loop = it.get_signature_runner("get_weights")(unused=np.float32(0))
    ref, ref_losses = run_reference(
        head, emb, onehot, warmup + steps, optimizer, initial_state(head.W, head.b, optimizer)
    )
    assert_state_close(
        {"W": loop["W"], "b": loop["b"]}, {"W": ref["W"], "b": ref["b"]}, TOL_REF, moved_from={"W": head.W}
    )
    np.testing.assert_allclose(losses, ref_losses[len(warmup) :], rtol=0, atol=TOL_LOSS)
    np.testing.assert_array_equal(loop["mask"], head.mask)


def test_tflite_loop_model_has_builtin_ops_only_and_all_signatures(tflite_models):
    from ai_edge_litert import schema_py_generated as schema

    it = interpreter(tflite_models["loop"])
    sigs = it.get_signature_list()
    assert set(sigs) == {"infer", "get_weights", "set_weights", "train_steps"}
    assert sorted(sigs["train_steps"]["inputs"]) == sorted(
        ["embedding", "labels", "order", "row_weight", "lr", "l2", "momentum", "optimizer"]
    )
    assert sigs["train_steps"]["outputs"] == ["losses"]
    # Every operator of every subgraph (the model's operator-code table), by builtin name.
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(tflite_models["loop"], 0))
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    ops = {names[max(code.builtinCode, code.deprecatedBuiltinCode)]: code.customCode for code in model.operatorCodes}
    assert {"WHILE", "IF", "FULLY_CONNECTED", "VAR_HANDLE", "ASSIGN_VARIABLE"} <= set(ops)
    assert "CUSTOM" not in ops and not any(ops.values()), ops  # no Flex or custom ops


# --- device runners --------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainers(onnx_models, tflite_models):
    return {
        "onnxruntime": OnnxLoopHeadTrainer(onnx_models["loop"], onnx_models["infer"], threads=1),
        "litert": LiteRTLoopHeadTrainer(tflite_models["loop"], threads=1),
    }


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_runners_match_reference_and_each_other_from_zero_state(data, trainers, optimizer):
    emb, onehot, head = data
    settings = TrainSettings(
        epochs=4,
        batch_size=4,
        learning_rate=0.3 if optimizer == "sgd" else 0.05,
        l2=L2,
        momentum=MU,
        optimizer=optimizer,
    )
    steps = batches(N, settings)
    ref, ref_losses = run_reference(
        head,
        emb,
        onehot,
        steps,
        optimizer,
        initial_state(head.W, head.b, optimizer),
        lr=effective_learning_rate(settings, emb),
    )
    results = {name: t.train(head, emb, onehot, settings) for name, t in trainers.items()}
    for name, (trained, losses) in results.items():
        assert_state_close(
            {"W": trained.W, "b": trained.b}, {"W": ref["W"], "b": ref["b"]}, TOL_REF, moved_from={"W": head.W}
        )
        np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=TOL_LOSS, err_msg=name)
        # Inactive classes get no gradient: their columns stay exactly as they were.
        np.testing.assert_array_equal(trained.W[:, 3:], head.W[:, 3:])
        np.testing.assert_array_equal(trained.b[3:], head.b[3:])
        assert trained.labels == head.labels and trained.anchor is head.anchor
    (a, la), (b, lb) = results["onnxruntime"], results["litert"]
    np.testing.assert_allclose(a.W, b.W, rtol=0, atol=TOL_REF)
    np.testing.assert_allclose(la, lb, rtol=0, atol=TOL_LOSS)


@pytest.mark.parametrize("backend", ["onnxruntime", "litert"])
def test_runner_probabilities_are_the_masked_softmax(data, trainers, backend):
    emb, _, head = data
    want = masked_softmax(emb.astype(np.float64) @ head.W + head.b, head.mask)
    got = trainers[backend].probabilities(head, emb)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.all(got[:, 3:] == 0)


@pytest.mark.parametrize("backend", ["onnxruntime", "litert"])
def test_runner_train_plan_runs_a_given_plan(data, trainers, backend):
    emb, onehot, head = data
    settings = TrainSettings(epochs=1, batch_size=4, optimizer="sgd", learning_rate=0.3, l2=L2, momentum=MU)
    order = np.array([[0, 1, 2], [3, 4, 4]], np.int64)
    row_weight = np.array([[1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]], np.float32)
    ref, _ = run_reference(
        head,
        emb,
        onehot,
        [np.array([0, 1, 2]), np.array([3, 4])],
        "sgd",
        initial_state(head.W, head.b, "sgd"),
        lr=effective_learning_rate(settings, emb),
    )
    if backend == "onnxruntime":
        state, losses = trainers[backend].train_plan(
            head, emb, onehot, order, row_weight, settings, initial_state(head.W, head.b, "sgd")
        )
        got = state["W"]
    else:
        trained, losses = trainers[backend].train_plan(head, emb, onehot, order, row_weight, settings)
        got = trained.W
    np.testing.assert_allclose(got, ref["W"], rtol=0, atol=TOL_REF)
    assert len(losses) == 2


@pytest.mark.parametrize("backend", ["onnxruntime", "litert"])
def test_runner_bad_inputs_say_what_was_received(data, trainers, backend):
    emb, onehot, head = data
    trainer, settings = trainers[backend], TrainSettings(epochs=1, batch_size=4)
    with pytest.raises(
        InputError, match=r"embeddings must have shape \(N, 6\) for this head, received shape \(11, 7\)"
    ):
        trainer.train(head, np.zeros((N, D + 1), np.float32), onehot, settings)
    with pytest.raises(InputError, match=r"labels must be one-hot with shape \(N, 5\).*received shape \(11, 3\)"):
        trainer.train(head, emb, onehot[:, :3], settings)
    with pytest.raises(InputError, match="same number of rows, received 11 and 10"):
        trainer.train(head, emb, onehot[:10], settings)
    with pytest.raises(InputError, match="at least 1 example, received 0"):
        trainer.train(head, emb[:0], onehot[:0], settings)
    with pytest.raises(InputError, match="embeddings must be finite numbers"):
        trainer.train(head, np.where(np.eye(N, D) > 0, np.nan, emb), onehot, settings)
    plan = (np.zeros((0, 4), np.int64), np.zeros((0, 4), np.float32))
    extra = (initial_state(head.W, head.b, "sgd"),) if backend == "onnxruntime" else ()
    with pytest.raises(InputError, match=r"the step plan is empty \(shape \(0, 4\)\)"):
        trainer.train_plan(head, emb, onehot, *plan, settings, *extra)
    with pytest.raises(
        InputError, match=r"order must hold integer example indices in \[0, 11\), received dtype int64, range \[0, 11\]"
    ):
        trainer.train_plan(head, emb, onehot, np.array([[0, 11]]), np.full((1, 2), 0.5, np.float32), settings, *extra)
    with pytest.raises(InputError, match="at least 1 example, received n=0"):
        plan_steps(0, settings)


def test_onnx_runner_refuses_missing_graph_and_wrong_state(data, onnx_models):
    emb, onehot, head = data
    only_sgd = OnnxLoopHeadTrainer({"sgd": onnx_models["loop"]["sgd"]}, onnx_models["infer"])
    with pytest.raises(InputError, match=r"no loop graph for optimizer 'adam'; this trainer has \['sgd'\]"):
        only_sgd.train(head, emb, onehot, TrainSettings(optimizer="adam", learning_rate=0.01))
    order, row_weight = plan_steps(N, TrainSettings(epochs=1, batch_size=4))
    with pytest.raises(
        InputError, match=r"state for sgd must have keys \['W', 'b', 'vel_W', 'vel_b'\], received \['W', 'b'\]"
    ):
        only_sgd.train_plan(head, emb, onehot, order, row_weight, TrainSettings(), {"W": head.W, "b": head.b})
    with pytest.raises(InputError, match=r"train_models must map 'sgd' and/or 'adam'.*received keys \['momentum'\]"):
        OnnxLoopHeadTrainer({"momentum": onnx_models["loop"]["sgd"]}, onnx_models["infer"])
