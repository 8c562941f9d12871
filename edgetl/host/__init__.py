"""Host side of edgetl: everything that imports TensorFlow.

Modules:
    data       -- image folders, .npz and CSV datasets, stratified splits, tf.data.
    backbones  -- the backbone registry (keras.applications, built-ins, user model files).
    transfer   -- backbone + fusion + head, two-phase training, strategies.
    pretrain   -- train a built-in backbone on a source task.
    run        -- run directories: saved model, config, history, metrics, plots.
    demo       -- the embedded end-to-end demo.

TensorFlow is imported lazily by the functions that need it, so importing this package
is cheap.
"""
