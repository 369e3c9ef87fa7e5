"""Export of training checkpoints as Hugging Face Llama folders (docs/export.md).

    export_checkpoint(checkpoint, out_dir, ...) -> ExportResult   (`megasparse export`)
"""
from megasparse.export.writer import ExportResult, export_checkpoint

__all__ = ["ExportResult", "export_checkpoint"]
