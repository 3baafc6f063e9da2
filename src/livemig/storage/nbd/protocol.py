"""NBD wire format: constants and pure codecs, no I/O.

Why pure: the server, the test client, the fault-injection proxy and the fuzz tests all speak the
same bytes, so every magic number and struct layout lives here once and can be tested without a
socket. Only the subset blockd needs is modelled: fixed newstyle negotiation, ``NBD_OPT_GO`` /
``NBD_OPT_INFO`` / ``NBD_OPT_EXPORT_NAME``, ``NBD_OPT_STARTTLS`` in forced mode (:func:`tls_gate`),
simple replies and structured replies (compact headers; no extended headers, no block status).

The request decoder (:func:`decode_request`) is the one place a client's bytes are judged. It
either returns a request plus an optional *rejection* (an NBD errno the server answers with, the
connection stays usable) or raises :class:`ProtocolError` (the stream can no longer be trusted;
the server drops that one connection). It never raises anything else, whatever the bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum, IntEnum, IntFlag

from livemig.errors import LivemigError

# --- magic numbers ------------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --- limits -------------------------------------------------------------------------------------

#: Largest payload (READ reply data or WRITE data) blockd accepts; advertised as the maximum block
#: size. Same value qemu uses, so qemu's client never splits differently against us.
MAX_PAYLOAD = 32 * 1024 * 1024
#: Preferred I/O size advertised in NBD_INFO_BLOCK_SIZE.
PREFERRED_BLOCK = 4096
#: Longest string (export name, message) the spec allows.
MAX_STRING = 4096
#: Option payloads above this are a denial-of-service attempt, not a real client.
MAX_OPTION_DATA = 64 * 1024

# --- enumerations -------------------------------------------------------------------------------


class HandshakeFlag(IntFlag):
    """Flags the server sends right after ``IHAVEOPT``."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    """Flags the client answers the greeting with."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


KNOWN_CLIENT_FLAGS = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES


class TransmissionFlag(IntFlag):
    """Per-export flags (sent with the export size)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(IntEnum):
    """Option haggling requests (``NBD_OPT_*``)."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR = 1 << 31


class OptionReply(IntEnum):
    """Option reply types (``NBD_REP_*``); errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR + 1
    ERR_POLICY = _REP_ERR + 2
    ERR_INVALID = _REP_ERR + 3
    ERR_PLATFORM = _REP_ERR + 4
    ERR_TLS_REQD = _REP_ERR + 5
    ERR_UNKNOWN = _REP_ERR + 6
    ERR_SHUTDOWN = _REP_ERR + 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
    ERR_TOO_BIG = _REP_ERR + 9

    @property
    def is_error(self) -> bool:
        return bool(self.value & _REP_ERR)


class InfoType(IntEnum):
    """Information items of ``NBD_OPT_INFO``/``NBD_OPT_GO`` (``NBD_INFO_*``)."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(IntEnum):
    """Transmission request types (``NBD_CMD_*``)."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlag(IntFlag):
    """Per-request flags (``NBD_CMD_FLAG_*``)."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyFlag(IntFlag):
    """Structured reply chunk flags."""

    DONE = 1 << 0


class ChunkType(IntEnum):
    """Structured reply chunk types (``NBD_REPLY_TYPE_*``)."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class Errno(IntEnum):
    """The only error values the protocol allows on the wire (not the host's errno numbers)."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


#: Commands blockd implements, and the command flags each one accepts (FUA is valid on all of them
#: by the spec's rule that a server advertising SEND_FUA must accept it on any command).
_ALLOWED_FLAGS: dict[Command, CommandFlag] = {
    Command.READ: CommandFlag.FUA | CommandFlag.DF,
    Command.WRITE: CommandFlag.FUA,
    Command.FLUSH: CommandFlag.FUA,
    Command.TRIM: CommandFlag.FUA,
    Command.WRITE_ZEROES: CommandFlag.FUA | CommandFlag.NO_HOLE,
}
_ALLOWED_FLAGS_INT: dict[int, int] = {int(c): int(f) for c, f in _ALLOWED_FLAGS.items()}
_READ, _WRITE, _DISC, _FLUSH, _WRITE_ZEROES = (
    int(c) for c in (Command.READ, Command.WRITE, Command.DISC, Command.FLUSH, Command.WRITE_ZEROES)
)
_DF = int(CommandFlag.DF)
#: Commands that modify the export: these pass the fencing gate.
WRITE_COMMANDS = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})


class ProtocolError(LivemigError):
    """The peer broke the protocol so that the byte stream can no longer be trusted.

    The server's answer to this is always the same: log one line, drop that connection, keep
    serving everyone else.
    """


# --- structs ------------------------------------------------------------------------------------

_GREETING = struct.Struct(">QQH")
_CLIENT_FLAGS = struct.Struct(">I")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY_HEADER = struct.Struct(">QIII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK_HEADER = struct.Struct(">IHHQI")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_ERROR_PAYLOAD = struct.Struct(">IH")

GREETING_SIZE = _GREETING.size  # 18
CLIENT_FLAGS_SIZE = _CLIENT_FLAGS.size  # 4
OPTION_HEADER_SIZE = _OPTION_HEADER.size  # 16
OPTION_REPLY_HEADER_SIZE = _OPTION_REPLY_HEADER.size  # 20
REQUEST_SIZE = _REQUEST.size  # 28
SIMPLE_REPLY_SIZE = _SIMPLE_REPLY.size  # 16
CHUNK_HEADER_SIZE = _CHUNK_HEADER.size  # 20
#: Bytes before the data in a one-chunk structured READ reply (chunk header + offset).
DATA_CHUNK_PREFIX = CHUNK_HEADER_SIZE + 8
ZEROES_124 = bytes(124)


# --- handshake ----------------------------------------------------------------------------------


def encode_greeting(flags: HandshakeFlag = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES) -> bytes:
    """Server's first 18 bytes: NBDMAGIC, IHAVEOPT, handshake flags."""
    return _GREETING.pack(NBDMAGIC, IHAVEOPT, int(flags))


def decode_greeting(data: bytes) -> HandshakeFlag:
    """Client side of :func:`encode_greeting`; rejects oldstyle servers."""
    if len(data) != GREETING_SIZE:
        raise ProtocolError(f"greeting must be {GREETING_SIZE} bytes, got {len(data)}")
    magic, opt_magic, flags = _GREETING.unpack(data)
    if magic != NBDMAGIC or opt_magic != IHAVEOPT:
        raise ProtocolError("not a newstyle NBD server (bad greeting magic)")
    return HandshakeFlag(flags & 0x3)


def encode_client_flags(flags: ClientFlag) -> bytes:
    return _CLIENT_FLAGS.pack(int(flags))


def decode_client_flags(data: bytes) -> ClientFlag:
    """The client's 32-bit flags; unknown bits are a protocol error (the spec says: drop)."""
    if len(data) != CLIENT_FLAGS_SIZE:
        raise ProtocolError(f"client flags must be {CLIENT_FLAGS_SIZE} bytes, got {len(data)}")
    (flags,) = _CLIENT_FLAGS.unpack(data)
    if flags & ~int(KNOWN_CLIENT_FLAGS):
        raise ProtocolError(f"client sent unknown handshake flags {flags:#x}")
    return ClientFlag(flags)


@dataclass(frozen=True, slots=True)
class OptionHeader:
    """One option the client sent: ``option`` stays an int so unknown options can be answered."""

    option: int
    length: int


def encode_option(option: int, data: bytes = b"") -> bytes:
    return _OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def decode_option_header(data: bytes) -> OptionHeader:
    """Parse the 16-byte option header; a wrong magic or an absurd length is fatal."""
    if len(data) != OPTION_HEADER_SIZE:
        raise ProtocolError(f"option header must be {OPTION_HEADER_SIZE} bytes, got {len(data)}")
    magic, option, length = _OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise ProtocolError(f"bad option magic {magic:#x}")
    if length > MAX_OPTION_DATA:
        raise ProtocolError(f"option {option} carries {length} bytes (limit {MAX_OPTION_DATA})")
    return OptionHeader(option, length)


def encode_option_reply(option: int, reply: OptionReply, data: bytes = b"") -> bytes:
    return _OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, int(reply), len(data)) + data


def encode_option_error(option: int, reply: OptionReply, message: str) -> bytes:
    """An error reply carrying a human-readable message (what qemu-img and nbdinfo print)."""
    return encode_option_reply(option, reply, message.encode()[:MAX_STRING])


@dataclass(frozen=True, slots=True)
class OptionReplyHeader:
    option: int
    reply: int
    length: int


def decode_option_reply_header(data: bytes) -> OptionReplyHeader:
    if len(data) != OPTION_REPLY_HEADER_SIZE:
        raise ProtocolError(f"option reply header must be {OPTION_REPLY_HEADER_SIZE} bytes")
    magic, option, reply, length = _OPTION_REPLY_HEADER.unpack(data)
    if magic != OPTION_REPLY_MAGIC:
        raise ProtocolError(f"bad option reply magic {magic:#x}")
    return OptionReplyHeader(option, reply, length)


@dataclass(frozen=True, slots=True)
class InfoRequest:
    """Payload of ``NBD_OPT_INFO`` / ``NBD_OPT_GO``: an export name and the info items wanted."""

    name: str
    requests: tuple[int, ...]


def encode_info_request(name: str, requests: tuple[int, ...] = (InfoType.BLOCK_SIZE,)) -> bytes:
    raw = name.encode()
    return _U32.pack(len(raw)) + raw + _U16.pack(len(requests)) + b"".join(_U16.pack(int(r)) for r in requests)


def decode_info_request(data: bytes) -> InfoRequest:
    """Parse an INFO/GO payload; every inconsistency becomes ProtocolError (answered ERR_INVALID)."""
    if len(data) < 6:
        raise ProtocolError("INFO/GO payload shorter than 6 bytes")
    (name_len,) = _U32.unpack_from(data, 0)
    if name_len > MAX_STRING or 4 + name_len + 2 > len(data):
        raise ProtocolError(f"INFO/GO export name length {name_len} does not fit the payload")
    try:
        name = data[4 : 4 + name_len].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("export name is not UTF-8") from exc
    if "\x00" in name:
        raise ProtocolError("export name contains NUL")
    (count,) = _U16.unpack_from(data, 4 + name_len)
    rest = data[4 + name_len + 2 :]
    if len(rest) != 2 * count:
        raise ProtocolError(f"INFO/GO announces {count} info requests but carries {len(rest)} bytes")
    requests = tuple(_U16.unpack_from(rest, 2 * i)[0] for i in range(count))
    return InfoRequest(name, requests)


def encode_info_export(size: int, flags: TransmissionFlag) -> bytes:
    return _INFO_EXPORT.pack(InfoType.EXPORT, size, int(flags))


def encode_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return _INFO_BLOCK_SIZE.pack(InfoType.BLOCK_SIZE, minimum, preferred, maximum)


def encode_info_name(name: str) -> bytes:
    return _U16.pack(InfoType.NAME) + name.encode()[:MAX_STRING]


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What a client learns about an export in ``NBD_REP_INFO`` replies."""

    size: int
    flags: TransmissionFlag
    block_size: tuple[int, int, int] | None = None


def decode_info_reply(data: bytes, into: ExportInfo | None) -> ExportInfo | None:
    """Fold one ``NBD_REP_INFO`` payload into what is known so far (unknown items are ignored)."""
    if len(data) < 2:
        raise ProtocolError("NBD_REP_INFO payload shorter than 2 bytes")
    (kind,) = _U16.unpack_from(data, 0)
    if kind == InfoType.EXPORT:
        if len(data) != _INFO_EXPORT.size:
            raise ProtocolError("NBD_INFO_EXPORT has the wrong length")
        _, size, flags = _INFO_EXPORT.unpack(data)
        return ExportInfo(size, TransmissionFlag(flags), into.block_size if into else None)
    if kind == InfoType.BLOCK_SIZE:
        if len(data) != _INFO_BLOCK_SIZE.size:
            raise ProtocolError("NBD_INFO_BLOCK_SIZE has the wrong length")
        _, minimum, preferred, maximum = _INFO_BLOCK_SIZE.unpack(data)
        if into is None:
            return ExportInfo(0, TransmissionFlag.HAS_FLAGS, (minimum, preferred, maximum))
        return ExportInfo(into.size, into.flags, (minimum, preferred, maximum))
    return into


def encode_export_name_reply(size: int, flags: TransmissionFlag, no_zeroes: bool) -> bytes:
    """Reply to ``NBD_OPT_EXPORT_NAME`` (the old way in, with no room for an error)."""
    return _EXPORT_NAME_REPLY.pack(size, int(flags)) + (b"" if no_zeroes else ZEROES_124)


class TlsGate(Enum):
    """What a server in forced-TLS mode does with one option (see :func:`tls_gate`)."""

    PASS = "pass"  # answer the option as usual
    START = "start"  # acknowledge STARTTLS, then hand the connection to the TLS handshake
    REQUIRE = "require"  # answer NBD_REP_ERR_TLS_REQD: TLS first
    ALREADY = "already"  # a second STARTTLS: NBD_REP_ERR_INVALID
    CLOSE = "close"  # NBD_OPT_EXPORT_NAME before TLS: it cannot carry an error, so drop the connection


def tls_gate(option: int, *, tls_active: bool) -> TlsGate:
    """The forced-TLS rule of the NBD spec ("TLS support", FORCEDTLS), for a server that requires TLS.

    Before TLS, only STARTTLS and ABORT are allowed; every other option (GO and INFO included, and
    options the server does not know) is answered with ``NBD_REP_ERR_TLS_REQD``, except
    ``NBD_OPT_EXPORT_NAME``, whose reply has no room for an error: the server closes. After TLS,
    a repeated STARTTLS is ``NBD_REP_ERR_INVALID``. A server that offers no TLS does not ask.
    """
    if option == Option.STARTTLS:
        return TlsGate.ALREADY if tls_active else TlsGate.START
    if tls_active or option == Option.ABORT:
        return TlsGate.PASS
    if option == Option.EXPORT_NAME:
        return TlsGate.CLOSE
    return TlsGate.REQUIRE


def option_name(option: int) -> str:
    """``go`` for 7, as qemu and libnbd print options; the number for unknown ones."""
    try:
        return Option(option).name.lower()
    except ValueError:
        return str(option)


# --- transmission: requests ---------------------------------------------------------------------


@dataclass(slots=True)
class Request:
    """One transmission request header. ``command`` stays an int: unknown ones get EINVAL."""

    flags: int
    command: int
    handle: int
    offset: int
    length: int

    @property
    def has_payload(self) -> bool:
        return self.command == Command.WRITE


@dataclass(frozen=True, slots=True)
class Rejection:
    """A request the server answers with an error instead of executing it."""

    error: Errno
    message: str


def encode_request(command: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    return _REQUEST.pack(REQUEST_MAGIC, flags, command, handle, offset, length)


def parse_request(header: bytes) -> Request:
    """Decode a 28-byte request header; only a bad size or magic is fatal here."""
    if len(header) != REQUEST_SIZE:
        raise ProtocolError(f"request header must be {REQUEST_SIZE} bytes, got {len(header)}")
    magic, flags, command, handle, offset, length = _REQUEST.unpack(header)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#010x}")
    return Request(flags, command, handle, offset, length)


def parse_request_from(buffer: bytes | bytearray, offset: int) -> Request:
    """:func:`parse_request` on the 28 bytes at ``offset`` of a receive buffer (no copy)."""
    magic, flags, command, handle, req_offset, length = _REQUEST.unpack_from(buffer, offset)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#010x}")
    return Request(flags, command, handle, req_offset, length)


def check_request(
    request: Request, export_size: int, *, structured: bool, max_payload: int = MAX_PAYLOAD
) -> Rejection | None:
    """Judge a well-framed request against the export; ``None`` means execute it.

    Raises :class:`ProtocolError` only when the framing itself cannot be kept: a WRITE whose
    payload exceeds ``max_payload`` (the spec lets the server disconnect rather than swallow an
    arbitrarily large payload it will refuse anyway). Runs once per request, so it compares plain
    ints (enum construction and IntFlag arithmetic cost microseconds each).
    """
    command = request.command
    length = request.length
    if command == _WRITE and length > max_payload:
        raise ProtocolError(f"WRITE of {length} bytes exceeds the {max_payload}-byte maximum payload")
    allowed = _ALLOWED_FLAGS_INT.get(command)
    if allowed is None:
        if command == _DISC:
            return None  # never answered, whatever its fields: the client is leaving either way
        return Rejection(Errno.EINVAL, f"{_command_label(command)} is not supported")
    if not structured:
        allowed &= ~_DF
    if request.flags & ~allowed:
        return Rejection(Errno.EINVAL, f"flags {request.flags:#x} not valid for {_command_label(command)}")
    if command == _FLUSH:
        if request.offset or length:
            return Rejection(Errno.EINVAL, "FLUSH must have zero offset and length")
        return None
    if length == 0:
        return Rejection(Errno.EINVAL, f"{_command_label(command)} of zero length")
    if command == _READ and length > max_payload:
        return Rejection(Errno.EINVAL, f"READ of {length} bytes exceeds the {max_payload}-byte maximum")
    offset = request.offset
    if offset > export_size or length > export_size - offset:
        return Rejection(
            Errno.ENOSPC if command in (_WRITE, _WRITE_ZEROES) else Errno.EINVAL,
            f"{_command_label(command)} [{offset}, +{length}) is past the end of the {export_size}-byte export",
        )
    return None


def _command_label(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return f"unknown command {command}"


def decode_request(
    header: bytes, export_size: int, *, structured: bool, max_payload: int = MAX_PAYLOAD
) -> tuple[Request, Rejection | None]:
    """:func:`parse_request` then :func:`check_request`: the whole judgement of a header."""
    request = parse_request(header)
    return request, check_request(request, export_size, structured=structured, max_payload=max_payload)


# --- transmission: replies ----------------------------------------------------------------------


def encode_simple_reply(handle: int, error: int = 0) -> bytes:
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def pack_simple_reply_into(buffer: bytearray, handle: int, error: int = 0) -> None:
    """Write a simple reply header at the front of ``buffer`` (data follows, no extra copy)."""
    _SIMPLE_REPLY.pack_into(buffer, 0, SIMPLE_REPLY_MAGIC, error, handle)


def encode_chunk(handle: int, chunk_type: ChunkType, payload: bytes = b"", *, done: bool = True) -> bytes:
    flags = ReplyFlag.DONE if done else 0
    return _CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, int(flags), int(chunk_type), handle, len(payload)) + payload


def pack_data_chunk_into(buffer: bytearray, handle: int, offset: int, data_length: int) -> None:
    """Write a final OFFSET_DATA chunk header (+ offset) at the front of ``buffer``."""
    _CHUNK_HEADER.pack_into(
        buffer, 0, STRUCTURED_REPLY_MAGIC, int(ReplyFlag.DONE), int(ChunkType.OFFSET_DATA), handle, 8 + data_length
    )
    _U64.pack_into(buffer, CHUNK_HEADER_SIZE, offset)


def encode_error_chunk(handle: int, error: Errno, message: str) -> bytes:
    raw = message.encode()[:MAX_STRING]
    return encode_chunk(handle, ChunkType.ERROR, _ERROR_PAYLOAD.pack(int(error), len(raw)) + raw)


def encode_error_reply(handle: int, error: Errno, message: str, *, structured: bool) -> bytes:
    """An error answer in whichever reply style was negotiated (structured carries the message)."""
    if structured:
        return encode_error_chunk(handle, error, message)
    return encode_simple_reply(handle, int(error))


@dataclass(frozen=True, slots=True)
class ReplyHeader:
    """A decoded reply header of either style. For simple replies ``chunk_type`` is None."""

    handle: int
    error: int = 0
    flags: int = ReplyFlag.DONE
    chunk_type: int | None = None
    length: int = 0

    @property
    def done(self) -> bool:
        return bool(self.flags & ReplyFlag.DONE)


def reply_header_size(first_four: bytes) -> int:
    """How many bytes the header that starts with these four magic bytes has."""
    (magic,) = _U32.unpack(first_four)
    if magic == SIMPLE_REPLY_MAGIC:
        return SIMPLE_REPLY_SIZE
    if magic == STRUCTURED_REPLY_MAGIC:
        return CHUNK_HEADER_SIZE
    raise ProtocolError(f"bad reply magic {magic:#010x}")


def decode_reply_header(data: bytes) -> ReplyHeader:
    if len(data) == SIMPLE_REPLY_SIZE:
        magic, error, handle = _SIMPLE_REPLY.unpack(data)
        if magic != SIMPLE_REPLY_MAGIC:
            raise ProtocolError(f"bad simple reply magic {magic:#010x}")
        return ReplyHeader(handle, error)
    if len(data) == CHUNK_HEADER_SIZE:
        magic, flags, chunk_type, handle, length = _CHUNK_HEADER.unpack(data)
        if magic != STRUCTURED_REPLY_MAGIC:
            raise ProtocolError(f"bad structured reply magic {magic:#010x}")
        return ReplyHeader(handle, 0, flags, chunk_type, length)
    raise ProtocolError(f"reply header of {len(data)} bytes")


def decode_error_payload(payload: bytes) -> tuple[int, str]:
    """Errno and message of an ERROR / ERROR_OFFSET chunk."""
    if len(payload) < _ERROR_PAYLOAD.size:
        raise ProtocolError("error chunk shorter than 6 bytes")
    error, msg_len = _ERROR_PAYLOAD.unpack_from(payload, 0)
    if _ERROR_PAYLOAD.size + msg_len > len(payload):
        raise ProtocolError("error chunk message overruns the chunk")
    message = payload[_ERROR_PAYLOAD.size : _ERROR_PAYLOAD.size + msg_len].decode("utf-8", "replace")
    return error, message


def decode_u64(data: bytes) -> int:
    return int(_U64.unpack_from(data, 0)[0])
