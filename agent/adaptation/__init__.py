"""Per-machine LoRA adapters on a frozen (optionally INT8) base model, trained on the device.

``lora``: numpy forward/backward of the base MLP plus low-rank branches, and training. ``graph``: the
"adaptable base" ONNX graph (a zero-default branch per adapted MatMul) and merged per-machine models.
``adapter``: the ``.onnx_adapter`` file, its manifest and the base-identity check. ``runtime``: one shared
base session serving every machine's adapter through ``RunOptions.add_active_adapter``. ``adapt``: the one
call a device makes (train on a machine's rows, write the adapter). Measured in ``docs/adaptation.md``.
"""
