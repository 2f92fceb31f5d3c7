"""The only layer that knows a path, a file format or the Hub: what a checkpoint holds and where outputs go.

``source`` (the :class:`~ckptdiff.io.source.Source` a checkpoint is read through), ``layout`` (every file-name
rule), ``resolve`` (a path or Hub id to its source: the front door), ``formats/`` (one module per file format),
``hub/`` (download and streamed reads), ``views/`` (what the stored tensors are as values: ties, FP8, experts),
``outputs`` (every file a run writes).
"""
