"""Serves prompts with a real ``sglang.Engine`` on the CPU, for ``test_sglang_engine.py``.

Run as ``python engine_run.py SPEC.json RESULT.json`` in a process of its own (the test puts the
``sgl_kernel`` stub on its path and sets the ``CHUNKKV_*`` variables): SGLang starts its
scheduler in a child process, which imports this file again as ``__mp_main__``.

``SPEC.json``: ``{"model": dir, "backend": name, "max_new_tokens": n, "prompts": {name: token
ids}, "steps": [[name, ...], ...]}``; each step is one ``Engine.generate`` call (several prompts:
one batch). ``RESULT.json``: per step and prompt its request id, output token ids and cached
prompt tokens, and the backend's report from ``get_server_info()`` (``None`` for ``triton``).
"""

import json
import sys


def main(spec_path: str, result_path: str) -> None:
    import sglang

    with open(spec_path) as f:
        spec = json.load(f)
    engine = sglang.Engine(
        model_path=spec["model"],
        attention_backend=spec["backend"],
        device="cpu",
        dtype="float32",  # the Triton interpreter gets bf16 tl.dot wrong
        chunked_prefill_size=128,
        max_running_requests=4,
        max_total_tokens=4096,
        mem_fraction_static=0.3,
        random_seed=0,
        log_level="info",
    )
    try:
        steps = []
        for names in spec["steps"]:
            outputs = engine.generate(
                input_ids=[spec["prompts"][name] for name in names],
                sampling_params={"max_new_tokens": spec["max_new_tokens"], "temperature": 0},
            )
            steps.append(
                [
                    {
                        "prompt": name,
                        "rid": out["meta_info"]["id"],
                        "output_ids": out["output_ids"],
                        "cached_tokens": out["meta_info"]["cached_tokens"],
                    }
                    for name, out in zip(names, outputs)
                ]
            )
        report = engine.get_server_info()["internal_states"][0].get("chunkkv")
    finally:
        engine.shutdown()
    with open(result_path, "w") as f:
        json.dump({"steps": steps, "chunkkv": report}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
