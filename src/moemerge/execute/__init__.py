"""The layer-by-layer executor: the one path through calibrate → group → merge → save → evaluate.

A model is a trunk (embeddings, rotary tables, final norm, LM head) plus decoder layers. The executor keeps the trunk
resident and walks the decoder layers one at a time: a :class:`~.source.LayerSource` builds layer ``i`` on the
compute device (read lazily from the checkpoint's safetensors shards, or taken from a model already in memory), the
calibration and evaluation hidden states go through it, its statistics are collected, it is grouped, merged and
handed to a :class:`~.sink.ShardSink` that writes output shards as layers finish, and then it is freed. Memory is one
decoder layer, the trunk and the hidden states, whatever the depth.

* :mod:`.weights`: the checkpoint's shard index and the conversion between hub key names and in-memory names;
* :mod:`.source`: :class:`ModelSource` (a loaded model) and :class:`ShardSource` (lazy, from shards);
* :mod:`.trunk`: the inputs of every decoder layer and the logits of the final hidden states, by the model's own
  forward with its decoder layers stubbed out;
* :mod:`.sink`: output shards, index and config, written into a temporary folder, verified and renamed;
* :mod:`.executor`: the passes (statistics, plan, merge and write) and streamed evaluation.
"""
