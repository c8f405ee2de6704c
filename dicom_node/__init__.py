"""cxr-node: a DICOM node that brings a chest X-ray model into a hospital's PACS."""

__version__ = "0.1.0"
