"""What the reference's autologging recorded at start: the hardware and the software."""
import os
import platform

import torch

from ncflib.runtime import cpu_name


def _memory_gb():
    try:
        return round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def hardware_info():
    info = {
        'cpu': cpu_name(),
        'cpu_count': os.cpu_count(),
        'memory_gb': _memory_gb(),
        'hostname': platform.node(),
        'os': platform.platform(),
        'python_version': platform.python_version(),
        'torch_version': torch.__version__,
        'cuda_version': torch.version.cuda,
        'cudnn_version': torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        'gpu_count': torch.cuda.device_count() if torch.cuda.is_available() else 0,
        'gpus': [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
    }
    if torch.cuda.is_available() and torch.distributed.is_nccl_available():
        info['nccl_version'] = '.'.join(map(str, torch.cuda.nccl.version()))
    return info


def log_hardware(logger):
    logger.log(step='PARAMETER', data=hardware_info())


def log_args(logger, flags):
    """The run's flags, a dict."""
    logger.log(step='PARAMETER', data=dict(flags))
