"""The trainers' data side: preference records and their file formats (records.py), DDPO token weights from a
correction (token_weights.py), prompts from the processor's chat template (prompts.py), collation into model inputs with
every tensor the processor returns (collate.py, inputs.py), padding-free rows (packed_rows.py), the seeded visiting
order (stream.py) and a run's records with its held-out split (run_records.py)."""
from .collate import IGNORE_INDEX, PairBatch, PairCollator, encode, open_media, takes_suffix
from .inputs import concat_rows, repeat_rows, select_rows, token_aligned
from .prompts import PromptFormat
from .records import (DataError, LoadReport, PreferenceRecord, as_hashable, load_records, open_images, open_video,
                      parse_record)
from .run_records import load_run_records, split_indices
from .stream import BatchStream
from .token_weights import correction_weights

__all__ = ["BatchStream", "DataError", "IGNORE_INDEX", "LoadReport", "PairBatch", "PairCollator", "PreferenceRecord",
           "PromptFormat", "as_hashable", "concat_rows", "correction_weights", "encode", "load_records",
           "load_run_records", "open_images", "open_media", "open_video", "parse_record", "repeat_rows", "select_rows",
           "split_indices", "takes_suffix", "token_aligned"]
