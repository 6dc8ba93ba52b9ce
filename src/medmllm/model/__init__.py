"""Models as three composed modules: modality encoders -> projector -> LLM.

``encoders`` turn a modality tensor into tokens (:class:`~medmllm.model.encoders.base.EncoderOutput`),
``projectors`` map encoder tokens into the LLM's embedding space; the LLM is a stock causal LM.
"""

# Importing the package registers MedMLLM with the transformers Auto classes, so
# AutoModel.from_pretrained(dir) loads a saved medmllm model without trust_remote_code.
from medmllm.model.mllm import MedMLLM, MedMLLMConfig  # noqa: E402,F401
