"""Answer-fidelity evaluation of ChunkKV against its baselines (``docs/EVAL.md``).

``python -m triton_chunkkv eval --out DIR`` generates the tasks offline (:mod:`.tasks`), runs
every policy at every budget through one shared prefill per prompt (:mod:`.engine`), appends the
results to ``DIR/results.jsonl`` (:mod:`.runner`) and writes ``DIR/report.md`` with its plots
(:mod:`.report`).
"""
