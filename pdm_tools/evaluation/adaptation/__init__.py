"""Per-machine LoRA adaptation measured on real data: a CWRU domain shift and SKAB per-file commissioning.

``python -m pdm_tools.evaluation.adaptation [--data DATASETS] [--json] [--only cwru|skab] [--quick]``

CWRU (defect classifier, ``agent.features.bearing`` features, MLP 48-64-32-4 as shipped). The shift:
damaged bearings of a defect diameter the fleet model has never seen (the documented weak spot, see
``docs/results_cwru.md``: cross-load is already 1.000). For each diameter d (one fold each):

  base        fitted (``fit_mlp``, the shipped recipe) on the other diameters at loads 0 and 1, and the
              healthy recording's parts 0 and 1;
  reference   the base on the other diameters at load 2 + healthy part 2 (no shift: what it should score);
  shifted     the base on diameter d at load 2 + healthy part 2 (the new machine);
  adapted     a LoRA adapter trained on at most ``--max-windows`` labelled windows of diameter d at loads 0
              and 1 (the technician-confirmed windows) + healthy windows of parts 0-1, tested as "shifted";
  scratch     an MLP fitted from scratch (same recipe) on the same small data, tested the same way;
  INT8        the same with the base quantized (static QDQ): adapter trained on the dequantized weights,
              served through ONNX Runtime on the INT8 adaptable base (QLoRA-style).

Recovered = (adapted − shifted) / (reference − shifted): the share of the accuracy lost to the shift that
the adapter wins back (target ≥ 0.75).

SKAB (anomaly autoencoder 80-32-8-32-80 on a causal lag window of 10 readings, score = reconstruction error
averaged over 10 steps). Per-file protocol of ``pdm_tools.evaluation.skab`` (first 400 rows = commissioning,
rest = test, point-wise, pooled). Two folds of files (alternating in sorted order): the fleet base of a
fold is fitted on ``anomaly-free.csv`` plus the commissioning rows of the *other* fold's files; each file
then gets an adapter trained on its own 400 commissioning rows (320 train, the last 80 held out), and a
from-scratch autoencoder on the same rows. Every variant uses the same label-free threshold rule: factor ×
the largest score on the commissioning rows.

Also measured: adapter file size against the FP32 base file, training time and peak traced memory, and
serving latency per window (original base; shared adaptable base with no adapter / with an adapter via
``RunOptions.add_active_adapter``; merged per-machine model) at batch 1 and 32, and the memory each option
costs per machine. Exits 2 with a message when the datasets are not there.

Modules: ``cwru`` (the diameter shift), ``skab`` (per-file commissioning), ``serving`` (latency and memory of
each way to serve an adapted machine), ``common`` (what both datasets share) and ``cli`` (the command line).
"""
