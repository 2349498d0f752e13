"""Data: tokenizer, transforms, datamodules for the design.md formats, and the synthetic world."""

from .classification import ImageClassificationDataModule, ImageFolderCalibration
from .datamodules import (
    CalibrationConfig,
    CalibrationDataModule,
    CaptionDataModule,
    RetrievalDataModule,
    VLDataModule,
    VQADataModule,
)
from .datasets import ImageCaptionsDataset, ImageTextDataset, VQADataset
from .processor import ProcessorDataModule, load_processor, processor_calibration_loader
from .records import DataRecordError, clean_text, load_records
from .synthetic import SyntheticWorld, WorldSizes, generate_world
from .tokenizer import build_tokenizer, write_vocab
from .transforms import CLIP_MEAN, CLIP_STD, build_test_transform, build_train_transform

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CalibrationConfig",
    "CalibrationDataModule",
    "CaptionDataModule",
    "DataRecordError",
    "ImageCaptionsDataset",
    "ImageClassificationDataModule",
    "ImageFolderCalibration",
    "ImageTextDataset",
    "ProcessorDataModule",
    "RetrievalDataModule",
    "SyntheticWorld",
    "VLDataModule",
    "VQADataModule",
    "VQADataset",
    "WorldSizes",
    "build_test_transform",
    "build_tokenizer",
    "build_train_transform",
    "clean_text",
    "generate_world",
    "load_processor",
    "load_records",
    "processor_calibration_loader",
    "write_vocab",
]
