"""Storage, a room of its own: every byte Taqrir keeps outside the database (received instances,
rendered key images, the model outputs kept for audit, a draft's DICOM objects), behind one
interface (:class:`Storage`) chosen by ``storage_url`` (:func:`open_storage`).

It does not know what a study is: callers name what they store with keys of their own making
(:func:`key_component` keeps an identifier one safe path component). It imports only the ground.
"""

from .errors import KeyTaken, StorageFailure
from .files import file_digest, fsync_dir, write_atomic
from .keys import StoredFile, check_key, key_component
from .local import SPARE_DIR_NAME, TMP_DIR_NAME, FileStorage, HandedOver, StagingFile
from .protocol import Storage
from .url import SUPPORTED, file_storage, open_storage

__all__ = [
    "SPARE_DIR_NAME",
    "SUPPORTED",
    "TMP_DIR_NAME",
    "FileStorage",
    "HandedOver",
    "KeyTaken",
    "StagingFile",
    "Storage",
    "StorageFailure",
    "StoredFile",
    "check_key",
    "file_digest",
    "file_storage",
    "fsync_dir",
    "key_component",
    "open_storage",
    "write_atomic",
]
