"""Host side of edgetl (TensorFlow): data, backbones, transfer, export.

    >>> from edgetl import host
    >>> data = host.load_dataset("photos/")
    >>> result = host.train(data, host.TrainConfig(backbone="my_model.h5", input_preprocessing="-1-1"))
    >>> host.save_run(result, "runs/photos")
    >>> host.export_bundle("runs/photos", "photos.edgetl", host.ExportOptions(quantize=("int8",))).bundle

TensorFlow is imported by the functions that need it, so importing this package is cheap.
Modules whose names start with ``_`` are internal and may change.
"""

from edgetl.data import Dataset, Splits, load_dataset, stratified_split
from edgetl.host._backbones import (
    Backbone,
    BackboneRecipe,
    InputPreprocessing,
    create_backbone,
    describe_layers,
    get_recipe,
    input_shape_of,
    list_backbones,
    register_backbone,
)
from edgetl.host._demo import run_demo
from edgetl.host._export import ExportOptions, ExportResult, QuantizeConfig, export, export_bundle
from edgetl.host._pretrain import pretrain
from edgetl.host._report import write_report
from edgetl.host._run import Run, load_run, save_run
from edgetl.host._tf_data import Augmentation
from edgetl.host._transfer import TrainConfig, TrainResult, configure_cpu_devices, train_transfer

train = train_transfer  # the name users call it by; train_transfer stays for existing code

__all__ = [
    "Dataset",
    "Splits",
    "load_dataset",
    "stratified_split",
    "Augmentation",
    "Backbone",
    "BackboneRecipe",
    "InputPreprocessing",
    "create_backbone",
    "describe_layers",
    "get_recipe",
    "input_shape_of",
    "list_backbones",
    "register_backbone",
    "TrainConfig",
    "TrainResult",
    "train",
    "train_transfer",
    "pretrain",
    "configure_cpu_devices",
    "Run",
    "save_run",
    "load_run",
    "QuantizeConfig",
    "ExportOptions",
    "ExportResult",
    "export",
    "export_bundle",
    "write_report",
    "run_demo",
]
