"""The ``machine`` part of every benchmark's JSON record: one set of keys, plus what a benchmark adds."""

from __future__ import annotations

import os
import platform


def machine_record(*, device: str = "cpu", **extra) -> dict:
    """CPUs, torch's threads and version, Python, the platform, the processor, ``device`` (and its
    GPU's name when it is a CUDA device that is there, else ``None``) and the load average now;
    ``extra`` adds keys or overrides these (``torch_threads=args.threads``)."""
    import torch  # here, so that ``--help`` does not wait for it

    device = str(device)
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    record = {
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(), "device": device,
        "load_average": list(os.getloadavg()), "gpu": torch.cuda.get_device_name(device) if cuda else None,
    }
    return {**record, **extra}
