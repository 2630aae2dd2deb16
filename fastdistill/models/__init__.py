"""Backbone factory (timm, open_clip) with one interface: embed, attention, bn_layers, normalisation."""
from fastdistill.models.backbone import Backbone
from fastdistill.models.factory import create_backbone, list_sources, parse_backbone_id, register_source
from fastdistill.models.spec import BackboneSpec
from fastdistill.models.weights import PACKAGED

__all__ = ["Backbone", "BackboneSpec", "PACKAGED", "create_backbone", "list_sources", "parse_backbone_id",
           "register_source"]
