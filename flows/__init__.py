"""Prefect flows over segcore: thin compositions of library calls (segcore never imports these).

- ``flows.segment``: ``segment_scene``, ``segment_batch``
- ``flows.ingest``: ``ingest_scene``
- ``flows.train``: ``train_model``
"""
