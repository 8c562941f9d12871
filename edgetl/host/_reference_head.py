"""The host reference for on-device personalization: the same head, retrained by Keras.

Same recipe as the device (linear masked-softmax head, L2 pull toward the anchor, SGD with
momentum or Adam, the same batches in the same order, the same normalised SGD step), but
implemented independently with tf_keras layers, losses and optimizers. The device result
should match it within a point of accuracy.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from edgetl.bundle._head import ADAM_BETA1, ADAM_BETA2, ADAM_EPS, MASK_NEG
from edgetl.device._head import HeadState, TrainSettings, batches, effective_learning_rate
from edgetl.host._tf import keras, tf


def keras_retrain(head: HeadState, emb: np.ndarray, onehot: np.ndarray, settings: TrainSettings) -> HeadState:
    k, t = keras(), tf()
    lr = effective_learning_rate(settings, emb)
    anchor = t.constant(head.anchor)
    mask_bias = t.constant((1.0 - head.mask) * MASK_NEG)

    class AnchorL2(k.regularizers.Regularizer):
        def __call__(self, w: Any) -> Any:
            return 0.5 * settings.l2 * t.reduce_sum(t.square(w - anchor))

    inputs = k.Input((emb.shape[1],))
    dense = k.layers.Dense(head.capacity, kernel_regularizer=AnchorL2(), name="classifier")
    logits = dense(inputs)
    # In-memory only (never saved), so the Lambda raises no safe-mode concern.
    probs = k.layers.Softmax()(k.layers.Add()([logits, k.layers.Lambda(lambda z: z * 0.0 + mask_bias)(logits)]))
    model = k.Model(inputs, probs)
    dense.set_weights([head.W, head.b])
    if settings.optimizer == "sgd":
        # Keras: v = m*v - lr*g; w += v. The device: v = m*v + g; w -= lr*v. Same for a fixed lr.
        opt = k.optimizers.SGD(lr, momentum=settings.momentum)
    else:
        opt = k.optimizers.Adam(lr, beta_1=ADAM_BETA1, beta_2=ADAM_BETA2, epsilon=ADAM_EPS)
    model.compile(optimizer=opt, loss=k.losses.CategoricalCrossentropy())
    for idx in batches(len(emb), settings):
        model.train_on_batch(emb[idx], onehot[idx])
    W, b = dense.get_weights()
    return replace(head, W=W.astype(np.float32), b=b.astype(np.float32))
