"""Collectives among the ranks of a job, each with a timeout: a small ``Transport`` interface
and its implementations over torch.distributed's store (``torch_dist``), MPI (``mpi``) and
nothing (``none``); ``connect`` picks the one this process can use."""

from .base import StreamAborted, Transport, TransportError, TransportTimeout
from .connect import agree_run_id, connect
from .files import DEFAULT_CHUNK_SIZE, FileSpec, read_chunks, receive_files, send_files, write_files
from .none import NoneTransport

__all__ = [
    "DEFAULT_CHUNK_SIZE", "FileSpec", "NoneTransport", "StreamAborted", "Transport", "TransportError",
    "TransportTimeout", "agree_run_id", "connect", "read_chunks", "receive_files", "send_files", "write_files",
]
