"""Committed autotune configs, one JSON file per GPU name (``<gpu>.json``, e.g.
``NVIDIA_H100_80GB_HBM3.json``): ``{kernel name: {key string: config}}``, where the key string
is ``"NAME=value,..."`` over the kernel's autotune keys and a config is ``{"kwargs",
"num_warps", "num_stages"}``.

On a GPU, :func:`triton_chunkkv.ops._runtime.tuned` kernels launch the config found here before
autotuning, so a warm start never re-tunes. ``python -m triton_chunkkv.autotune_cache``
regenerates the file of the GPU it runs on.
"""
