"""``ssse info``: how the kernels were built, the devices torch sees and the data sets
available offline."""

from __future__ import annotations

import json

import torch

__all__ = ["run"]


def run(args) -> int:
    import platform

    import ssse_ext

    from ssse.data import DataUnavailableError, FASHION_MNIST_DIR, yeast_file

    info = {"ssse": ssse_ext.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "build": ssse_ext.build_info(),
            "cuda_available": torch.cuda.is_available(),
            "devices": ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})"
                                  for i in range(torch.cuda.device_count())]}
    data = {"digits": "bundled with scikit-learn"}
    fm = [p for p in FASHION_MNIST_DIR.glob("*-ubyte*")] if FASHION_MNIST_DIR.is_dir() else []
    data["fashion-mnist"] = (str(FASHION_MNIST_DIR) if len(fm) >= 4 else
                             "not installed (apt-get install dataset-fashion-mnist, "
                             "or --data-dir)")
    try:
        data["yeast"] = str(yeast_file(None))
    except DataUnavailableError:
        data["yeast"] = "not found (pip install river, or --data-dir with yeast.csv)"
    info["data"] = data
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = 20
    for key in ("ssse", "torch", "python", "threads", "cuda_available"):
        print(f"{key:<{width}} {info[key]}")
    for key, value in info["build"].items():
        if key != "version":
            print(f"{key:<{width}} {value}")
    print(f"{'devices':<{width}} {', '.join(info['devices'])}")
    for key, value in data.items():
        print(f"{'data ' + key:<{width}} {value}")
    return 0
