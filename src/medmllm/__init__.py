"""medmllm: build, train, evaluate and serve medical multimodal LLMs.

The package is laid out the way data travels: ``data`` (readers, preprocessing,
instruction records, converters, phantoms) -> ``model`` (encoders -> projector
-> LLM) -> ``train`` / ``eval`` / ``serve``.
"""

__version__ = "0.1.0"
