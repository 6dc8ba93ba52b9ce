"""Training: the engine (accelerate setup, data order, the loop, exact resume), checkpoints and
run logging, plus one linear recipe per training stage (setup -> train -> save -> cleanup).

* :mod:`medmllm.train.engine`     — ``TrainLoop``, ``TrainSettings``, samplers, ``MixtureDataset``
* :mod:`medmllm.train.checkpoint` — atomic checkpoints: weights, optimizer, scheduler, RNG, data position
* :mod:`medmllm.train.logging`    — run info, metrics.jsonl, TensorBoard, progress bar, loss plot
"""
