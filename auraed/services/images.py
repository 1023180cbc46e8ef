"""aurae.images.v0.ImageService: the local image store over the API."""

from __future__ import annotations

import grpc

from aurae_sdk.wire.generated.pb.images import images_pb2 as pb
from auraed.generated.images import ImageServiceBase
from auraed.images import Image, ImageStore, open_source
from auraed.validation import blaming
from auraed.validation import images as valid


def image_message(image: Image) -> pb.Image:
    config = image.config
    return pb.Image(
        id=image.id,
        manifest_digest=image.manifest_digest,
        references=list(image.references),
        size=image.size,
        imported_at=image.imported_at,
        config=pb.ImageConfig(
            entrypoint=list(config.entrypoint), cmd=list(config.cmd), env=list(config.env),
            working_dir=config.working_dir, user=config.user,
            architecture=config.architecture, os=config.os, labels=config.labels,
        ),
        layers=[pb.ImageLayer(digest=layer.digest, diff_id=diff_id, size=layer.size,
                              media_type=layer.media_type)
                for layer, diff_id in zip(image.layers, config.diff_ids, strict=True)],
    )


class ImageService(ImageServiceBase):
    def __init__(self, store: ImageStore) -> None:
        self.store = store

    def import_(self, request: pb.ImageServiceImportRequest,
                context: grpc.ServicerContext) -> pb.ImageServiceImportResponse:
        with blaming(valid.IMPORT_FIELDS):
            source = open_source(request.file_name)
            try:
                name = request.reference if request.HasField("reference") else None
                images = self.store.pull(source, name=name)
            finally:
                source.close()
        return pb.ImageServiceImportResponse(images=[image_message(i) for i in images])

    def list(self, request: pb.ImageServiceListRequest,
             context: grpc.ServicerContext) -> pb.ImageServiceListResponse:
        return pb.ImageServiceListResponse(images=[image_message(i) for i in self.store.list()])

    def inspect(self, request: pb.ImageServiceInspectRequest,
                context: grpc.ServicerContext) -> pb.ImageServiceInspectResponse:
        with blaming(valid.INSPECT_FIELDS):
            image = self.store.get(request.image_name)
        return pb.ImageServiceInspectResponse(image=image_message(image))

    def remove(self, request: pb.ImageServiceRemoveRequest,
               context: grpc.ServicerContext) -> pb.ImageServiceRemoveResponse:
        with blaming(valid.REMOVE_FIELDS):
            removed = self.store.remove(request.image_name)
        return pb.ImageServiceRemoveResponse(image=image_message(removed))
