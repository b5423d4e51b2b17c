"""Blob bytes: one narrow interface (`BlobStore`) and its backends."""

from skyreg.store.base import BlobStore, UploadUnknown
from skyreg.store.filesystem import FilesystemBlobStore

__all__ = ["BlobStore", "FilesystemBlobStore", "UploadUnknown"]
