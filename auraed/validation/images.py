"""aurae.images.v0.ImageService: which request field each image subject came from.

The store (auraed.images) blames an image, an image source or a reference; the service names
the field through these tables (auraed.validation.blaming)."""

from __future__ import annotations

from auraed.errors import Subject
from auraed.validation import FieldsBySubject

IMPORT_FIELDS: FieldsBySubject = {
    Subject.IMAGE_SOURCE: "file_name",
    Subject.IMAGE_REFERENCE: "reference",
}
INSPECT_FIELDS: FieldsBySubject = {Subject.IMAGE: "image_name"}
REMOVE_FIELDS: FieldsBySubject = INSPECT_FIELDS
