"""Rows of any tabular input file, chosen by its name, each as ``(line, dict)`` with errors naming file and line.

Formats: JSON Lines (``.jsonl``, ``.json``), CSV (``.csv``, RFC 4180 quoting), TSV (``.tsv``, no quoting: a field
holds no tab or line break), each optionally ``.gz``; parquet (``.parquet``, ``.pq``); a Hugging Face ``datasets``
folder written by ``Dataset.save_to_disk`` (read with ``datasets.load_from_disk`` when installed, else its Arrow
files with pyarrow). CSV/TSV need a header line; their "line" is the physical line where a record starts. For
parquet and datasets folders the "line" is the 1-based row number.

A file's *columns* are its header (CSV/TSV), its schema (parquet, datasets) or, for JSON Lines, which has no schema,
the keys of its first row (``Rows.fixed`` is False: later rows may carry other keys).
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import IO, Any

from nvr.data.jsonl import iter_jsonl
from nvr.utils.errors import InputError

Row = tuple[int, dict[str, Any]]
_BATCH_ROWS = 8192
_CSV_FIELD_LIMIT = 2**31 - 1
"""Python's csv module refuses fields over 128 KiB by default; long passages are legitimate."""
HF_STATE = "state.json"
HF_INFO = "dataset_info.json"
HF_DICT = "dataset_dict.json"
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet"}
SUPPORTED = ".jsonl, .json, .csv, .tsv (each optionally .gz), .parquet, or a datasets folder (save_to_disk)"
INSTALL_HINT = "pip install 'datasets>=2.19' (or nvr[hf])"


@dataclass
class Rows:
    """An input file opened for streaming: its format, its columns and the ``(line, row)`` iterator."""

    path: Path
    format: str
    """``jsonl``, ``csv``, ``tsv``, ``parquet`` or ``hf`` (a datasets folder)."""
    columns: tuple[str, ...]
    fixed: bool
    """True when every row has exactly ``columns`` (all formats but JSON Lines)."""
    rows: Iterator[Row]
    first_line: int | None = None
    """Line of the row ``columns`` were read from (JSON Lines), for errors about them."""
    closer: Callable[[], None] | None = None

    def __enter__(self) -> Rows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the open file even when no row was read (a bad header mapping stops before the first)."""
        close = getattr(self.rows, "close", None)
        if close is not None:
            close()
        if self.closer is not None:
            self.closer()

    @property
    def typed(self) -> bool:
        """False for CSV/TSV, whose every cell is one string (no lists, no null)."""
        return self.format not in ("csv", "tsv")

    def __iter__(self) -> Iterator[Row]:
        return self.rows


def file_format(path: str | Path) -> str:
    """The format of ``path`` from its name (``hf`` for a folder); unknown names are an ``InputError``."""
    path = Path(path)
    if path.is_dir():
        return "hf"
    name = path.name.lower().removesuffix(".gz")
    for suffix, fmt in SUFFIXES.items():
        if name.endswith(suffix) and not (fmt == "parquet" and path.name.lower().endswith(".gz")):
            return fmt
    hint = "; a .txt file (one passage per line) can be a data.corpus_file" if name.endswith(".txt") else ""
    raise InputError(f"unsupported file type '{''.join(path.suffixes) or path.name}': use {SUPPORTED}{hint}", path)


def data_files(path: str | Path) -> list[tuple[str, Path]]:
    """``(relative name, path)`` of every file whose bytes the rows of ``path`` come from: the file itself (name
    ``""``), or each file of a datasets folder (for content fingerprints). Cheap: checks existence and folder
    layout, reads no row."""
    from nvr.utils.fingerprint import folder_files

    path = Path(path)
    if path.is_dir():
        _check_hf_folder(path)
        return folder_files(path)
    if not path.is_file():
        raise InputError("file not found", path)
    return [("", path)]


def open_rows(path: str | Path) -> Rows:
    """Open any supported file (or datasets folder) for streaming its rows."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", path)
    fmt = file_format(path)
    if fmt == "jsonl":
        return _jsonl_rows(path)
    if fmt in ("csv", "tsv"):
        return _delimited_rows(path, fmt)
    if fmt == "parquet":
        return _parquet_rows(path)
    return _hf_rows(path)


# --------------------------------------------------------------------------------------------------- JSON Lines
def _jsonl_rows(path: Path) -> Rows:
    if path.name.lower().removesuffix(".gz").endswith(".json"):
        _refuse_json_array(path)
    it = iter_jsonl(path)
    first = next(it, None)
    if first is None:
        return Rows(path, "jsonl", (), False, iter(()))
    return Rows(path, "jsonl", tuple(first[1]), False, chain([first], it), first_line=first[0], closer=it.close)


def _refuse_json_array(path: Path) -> None:
    """A ``.json`` file holding one JSON array is not JSON Lines: say how to convert it (instead of a parse error)."""
    with _open_binary(path) as fh:
        try:
            for line_no, raw in enumerate(fh, start=1):
                stripped = raw.lstrip(b"\xef\xbb\xbf").strip()
                if stripped:
                    if stripped.startswith(b"["):
                        raise InputError("a JSON array, not JSON Lines (one object per line): write it with "
                                         "Dataset.to_json(path) or convert it with jq -c '.[]'", path, line_no)
                    return
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise InputError(f"corrupt gzip data ({exc})", path) from exc


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


# ------------------------------------------------------------------------------------------------------ CSV / TSV
def _delimited_rows(path: Path, fmt: str) -> Rows:
    """Header + records; the header is read here so that its errors surface when the file is opened."""
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    fh = _open_binary(path)
    try:
        lines = decoded_lines(fh, path)
        options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {"delimiter": ","}
        reader = csv.reader(lines, strict=True, **options)
        header = _read_header(reader, path, fmt)
    except BaseException:
        fh.close()
        raise
    return Rows(path, fmt, header, True, _records(fh, reader, header, path, fmt), closer=fh.close)


def decoded_lines(fh: IO[bytes], path: Path) -> Iterator[str]:
    """Physical lines as text (with their line ending, which the csv module needs inside quoted fields)."""
    line_no = 0
    try:
        for line_no, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})", path, line_no) from exc
            yield text.removeprefix("\ufeff") if line_no == 1 else text
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(f"corrupt gzip data ({exc})", path, line_no + 1) from exc


def _read_header(reader: Any, path: Path, fmt: str) -> tuple[str, ...]:
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise InputError(f"malformed {fmt.upper()} header ({exc})", path, 1) from exc
    if not header or not any(name.strip() for name in header):
        raise InputError(f"empty first line: a {fmt.upper()} file starts with a header naming its columns", path, 1)
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise InputError(f"column {name!r} appears twice in the header", path, 1)
        seen.add(name)
    return tuple(header)


def _records(fh: IO[bytes], reader: Any, header: tuple[str, ...], path: Path, fmt: str) -> Iterator[Row]:
    kind = fmt.upper()
    with fh:
        start = reader.line_num + 1
        while True:
            try:
                record = next(reader, None)
            except csv.Error as exc:
                raise InputError(f"malformed {kind} record ({exc}); a quoted field must end with a quote",
                                 path, start) from exc
            if record is None:
                return
            if record:  # the csv module returns [] for a blank line
                if len(record) != len(header):
                    raise InputError(f"expected {len(header)} fields (header: {', '.join(header)}), got "
                                     f"{len(record)}" + _tsv_hint(kind), path, start)
                yield start, dict(zip(header, record))
            start = reader.line_num + 1


def _tsv_hint(kind: str) -> str:
    return "; TSV fields are not quoted, so a field cannot hold a tab (use CSV for that)" if kind == "TSV" else ""


# ---------------------------------------------------------------------------------------------------------- parquet
def _parquet_rows(path: Path) -> Rows:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types (ArrowInvalid, OSError) for unreadable files
        raise InputError(f"cannot read parquet file ({exc})", path) from exc
    batches = reader.iter_batches(batch_size=_BATCH_ROWS)
    return Rows(path, "parquet", tuple(reader.schema_arrow.names), True, _numbered(batches))


def _numbered(batches: Iterable[Any]) -> Iterator[Row]:
    row_no = 0
    for batch in batches:
        for row in batch.to_pylist():
            row_no += 1
            yield row_no, row


# -------------------------------------------------------------------------------------------- datasets folders
def _check_hf_folder(path: Path) -> None:
    """A folder must be one ``Dataset.save_to_disk`` output; a ``DatasetDict`` folder must be narrowed to a split."""
    dict_file = path / HF_DICT
    if dict_file.is_file():
        splits = _json_file(dict_file).get("splits") or sorted(p.name for p in path.iterdir() if p.is_dir())
        example = path / str(splits[0]) if splits else path / "train"
        raise InputError(f"a DatasetDict folder (splits: {', '.join(map(str, splits))}); point at one split's "
                         f"folder, e.g. {example}", path)
    if not (path / HF_STATE).is_file() or not (path / HF_INFO).is_file():
        beir = " (it looks like a BEIR folder: use data.beir_dir)" if (path / "qrels").is_dir() else ""
        raise InputError(f"a folder, but not a datasets folder ({HF_STATE} and {HF_INFO} from Dataset.save_to_disk "
                         f"are missing){beir}; a file must be one of {SUPPORTED}", path)


def _hf_rows(path: Path) -> Rows:
    _check_hf_folder(path)
    try:
        import datasets
    except ImportError:
        return _hf_rows_pyarrow(path)
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a damaged folder
        raise InputError(f"cannot read datasets folder ({type(exc).__name__}: {exc})", path) from exc
    if not isinstance(ds, datasets.Dataset):
        raise InputError(f"expected a Dataset folder, got a {type(ds).__name__}", path)
    batches = ds.with_format("arrow").iter(batch_size=_BATCH_ROWS)
    return Rows(path, "hf", tuple(ds.column_names), True, _numbered(batches))


def _hf_rows_pyarrow(path: Path) -> Rows:
    """Without ``datasets``: the Arrow stream files listed in ``state.json``, in order (what ``load_from_disk``
    concatenates)."""
    import pyarrow as pa

    try:
        state = _json_file(path / HF_STATE)
        files = [path / str(f["filename"]) for f in state["_data_files"]]
        schema = pa.ipc.open_stream(pa.memory_map(str(files[0]))).schema if files else None
    except (OSError, ValueError, KeyError, TypeError, IndexError, pa.ArrowException) as exc:
        raise InputError(f"cannot read this datasets folder without the datasets package ({exc}); "
                         f"{INSTALL_HINT}", path) from exc
    if schema is None:
        return Rows(path, "hf", (), True, iter(()))
    return Rows(path, "hf", tuple(schema.names), True, _numbered(_arrow_batches(files, path)))


def _arrow_batches(files: list[Path], path: Path) -> Iterator[Any]:
    import pyarrow as pa

    for file in files:
        try:
            reader = pa.ipc.open_stream(pa.memory_map(str(file)))
            yield from reader
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"cannot read {file.name} ({exc}); {INSTALL_HINT} reads more layouts", path) from exc


def _json_file(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read ({exc})", path) from exc
    if not isinstance(obj, dict):
        raise InputError("expected a JSON object", path)
    return obj
