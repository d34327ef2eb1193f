"""The choice-data format (HDF5, version 1) and its reader and writer."""

from estpipe.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    ChoiceData,
    ChoiceDataFile,
    ChoiceDataWriter,
    provenance,
    read_choice_data,
    write_choice_data,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ChoiceData",
    "ChoiceDataFile",
    "ChoiceDataWriter",
    "provenance",
    "read_choice_data",
    "write_choice_data",
]
