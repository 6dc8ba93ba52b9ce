"""Models as three composed modules: modality encoders -> projector -> LLM.

``encoders`` turn a modality tensor into tokens (:class:`~medmllm.model.encoders.base.EncoderOutput`),
``projectors`` map encoder tokens into the LLM's embedding space; the LLM is a stock causal LM.
"""
