"""Serving moemerge checkpoints in inference engines.

``vllm_plugin`` is vLLM's entry point (group ``vllm.general_plugins``); it teaches vLLM the ``mapped`` format
(docs/formats.md). Nothing here is imported by the rest of moemerge, so these modules may depend on the engine's own
(older) transformers.
"""
