"""Container images: a content-addressed local store and the sources images come from.

`ImageStore` keeps blobs by digest under the daemon's library dir and an index of image
references; `sources` reads OCI image layouts and archives of them, behind the `ImageSource`
interface a registry client would also implement; `unpack` turns layers into directories that
overlayfs can stack. Nothing here knows of gRPC.
"""

from auraed.images.reference import normalize_reference
from auraed.images.sources import ImageSource, open_source
from auraed.images.store import Image, ImageStore

__all__ = ["Image", "ImageSource", "ImageStore", "normalize_reference", "open_source"]
