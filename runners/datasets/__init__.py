"""Dataset loaders: local files in each workload's real format -> ``Workload``.

Every loader takes a local file or directory and a ``limit``, never tokenizes, never touches
the network and never crashes on a bad row: it skips the row and counts the reason in
``Workload.skipped``. A missing dataset raises ``DatasetNotFound`` (one line naming the file
to download or the flag to pass); a file that is not in the expected format at all (no
header, missing column) raises ``DatasetFormatError`` naming the file, line and field.
"""

from __future__ import annotations


class DatasetNotFound(Exception):
    """The dataset file is not there: the message names the download script or the flag."""


class DatasetFormatError(ValueError):
    """The file as a whole is unusable (e.g. a CSV without a required column)."""


from kvtier.runners.datasets.arrivals import load_azure, load_mooncake  # noqa: E402
from kvtier.runners.datasets.burstgpt import load_burstgpt  # noqa: E402
from kvtier.runners.datasets.longbench_v2 import load_longbench_v2  # noqa: E402
from kvtier.runners.datasets.ruler import load_ruler  # noqa: E402
from kvtier.runners.datasets.sharegpt import load_sharegpt  # noqa: E402

#: loader per workload name (the names ``kvtier run`` uses, plus the two arrival traces)
LOADERS = {
    "ruler": load_ruler,
    "longbench-v2": load_longbench_v2,
    "sharegpt": load_sharegpt,
    "burstgpt": load_burstgpt,
    "mooncake": load_mooncake,
    "azure": load_azure,
}

__all__ = [
    "LOADERS",
    "DatasetFormatError",
    "DatasetNotFound",
    "load_azure",
    "load_burstgpt",
    "load_longbench_v2",
    "load_mooncake",
    "load_ruler",
    "load_sharegpt",
]
