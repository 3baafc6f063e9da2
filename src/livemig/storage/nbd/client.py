"""A small blocking NBD client: handshake with NBD_OPT_GO, then pipelined requests.

Why our own: tests need to send exactly the bytes they mean (bad ones too) and to keep many
requests in flight; the benchmark needs one client it can point at blockd and at qemu-nbd alike.
It speaks the same codecs as the server (``protocol``), so a codec bug would show up on both
sides - which is why the integration tests also use qemu's and libnbd's clients.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from livemig.errors import LivemigError
from livemig.storage.nbd import protocol as p


class NbdError(LivemigError):
    """The server answered a request with an NBD error."""

    def __init__(self, error: int, message: str = "") -> None:
        try:
            name = p.Errno(error).name
        except ValueError:
            name = f"errno {error}"
        super().__init__(f"NBD {name}{': ' + message if message else ''}", error=error)
        self.error = error


class NegotiationError(LivemigError):
    """The server refused an option (``reply`` is the NBD_REP_ERR_* code)."""

    def __init__(self, reply: int, message: str) -> None:
        try:
            name = p.OptionReply(reply).name
        except ValueError:
            name = f"reply {reply:#x}"
        super().__init__(f"{name}: {message}", reply=reply)
        self.reply = reply


@dataclass(frozen=True)
class Reply:
    """A complete reply to one request."""

    handle: int
    error: int
    data: bytes = b""
    message: str = ""


class NbdClient:
    """One connection to one export. Not thread-safe."""

    def __init__(
        self,
        host: str,
        port: int,
        export: str,
        *,
        structured: bool = True,
        timeout: float = 30.0,
    ) -> None:
        self.export = export
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.structured = False
        self.size = 0
        self.flags = p.TransmissionFlag(0)
        self.block_size: tuple[int, int, int] | None = None
        self._next_handle = 1
        self._pending: dict[int, tuple[int, int]] = {}
        try:
            self._negotiate(structured)
        except BaseException:
            self.sock.close()
            raise

    # --- handshake -------------------------------------------------------------------------------

    def _negotiate(self, structured: bool) -> None:
        server_flags = p.decode_greeting(self._recv(p.GREETING_SIZE))
        flags = p.ClientFlag.FIXED_NEWSTYLE
        if server_flags & p.HandshakeFlag.NO_ZEROES:
            flags |= p.ClientFlag.NO_ZEROES
        self.sock.sendall(p.encode_client_flags(flags))
        if structured:
            reply, _ = self.option(p.Option.STRUCTURED_REPLY)
            self.structured = reply == p.OptionReply.ACK
        request = p.encode_info_request(self.export, (p.InfoType.BLOCK_SIZE,))
        self.sock.sendall(p.encode_option(p.Option.GO, request))
        info: p.ExportInfo | None = None
        while True:
            header, data = self._option_reply()
            if header.reply == p.OptionReply.INFO:
                info = p.decode_info_reply(data, info)
                continue
            if header.reply == p.OptionReply.ACK:
                break
            raise NegotiationError(header.reply, data.decode("utf-8", "replace"))
        if info is None:
            raise p.ProtocolError("server finished NBD_OPT_GO without NBD_INFO_EXPORT")
        self.size, self.flags, self.block_size = info.size, info.flags, info.block_size

    def option(self, option: int, data: bytes = b"") -> tuple[int, bytes]:
        """Send one option during negotiation; return the final reply type and its data."""
        self.sock.sendall(p.encode_option(option, data))
        header, payload = self._option_reply()
        return header.reply, payload

    def _option_reply(self) -> tuple[p.OptionReplyHeader, bytes]:
        header = p.decode_option_reply_header(self._recv(p.OPTION_REPLY_HEADER_SIZE))
        return header, self._recv(header.length) if header.length else b""

    # --- pipelined requests ----------------------------------------------------------------------

    def submit(self, command: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0) -> int:
        """Send one request without waiting; returns its handle."""
        handle = self._next_handle
        self._next_handle += 1
        header = p.encode_request(command, handle, offset, length if command != p.Command.WRITE else len(data), flags)
        self.sock.sendall(header + data if data else header)
        self._pending[handle] = (command, length)
        return handle

    def receive(self) -> Reply:
        """Wait for the next complete reply (any pending request)."""
        first = self._recv(4)
        size = p.reply_header_size(first)
        header = p.decode_reply_header(first + self._recv(size - 4))
        command, length = self._pending.get(header.handle, (None, 0))
        if command is None:
            raise p.ProtocolError(f"reply for unknown handle {header.handle}")
        if header.chunk_type is None:  # simple reply
            data = self._recv(length) if command == p.Command.READ and header.error == 0 else b""
            del self._pending[header.handle]
            return Reply(header.handle, header.error, data)
        return self._structured(header, length)

    def _structured(self, header: p.ReplyHeader, length: int) -> Reply:
        parts: list[tuple[int, bytes]] = []
        error, message = 0, ""
        while True:
            payload = self._recv(header.length) if header.length else b""
            if header.chunk_type == p.ChunkType.OFFSET_DATA:
                parts.append((p.decode_u64(payload), payload[8:]))
            elif header.chunk_type == p.ChunkType.OFFSET_HOLE:
                offset = p.decode_u64(payload)
                hole = int.from_bytes(payload[8:12], "big")
                parts.append((offset, bytes(hole)))
            elif header.chunk_type is not None and header.chunk_type & 0x8000:
                error, message = p.decode_error_payload(payload)
            if header.done:
                break
            first = self._recv(4)
            nxt = p.decode_reply_header(first + self._recv(p.reply_header_size(first) - 4))
            if nxt.handle != header.handle:
                raise p.ProtocolError("interleaved structured replies are not supported by this client")
            header = nxt
        del self._pending[header.handle]
        data = b"".join(chunk for _, chunk in sorted(parts)) if parts and not error else b""
        return Reply(header.handle, error, data, message)

    @property
    def pending(self) -> int:
        return len(self._pending)

    # --- one-at-a-time helpers -------------------------------------------------------------------

    def _call(self, command: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0) -> Reply:
        handle = self.submit(command, offset, length, data, flags)
        reply = self.receive()
        if reply.handle != handle:
            raise p.ProtocolError("reply out of order in a one-at-a-time call")
        if reply.error:
            raise NbdError(reply.error, reply.message)
        return reply

    def read(self, offset: int, length: int) -> bytes:
        return self._call(p.Command.READ, offset, length).data

    def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        self._call(p.Command.WRITE, offset, len(data), data, p.CommandFlag.FUA if fua else 0)

    def flush(self) -> None:
        self._call(p.Command.FLUSH)

    def trim(self, offset: int, length: int) -> None:
        self._call(p.Command.TRIM, offset, length)

    def write_zeroes(self, offset: int, length: int, *, no_hole: bool = False) -> None:
        self._call(p.Command.WRITE_ZEROES, offset, length, flags=p.CommandFlag.NO_HOLE if no_hole else 0)

    def close(self) -> None:
        """Soft disconnect (NBD_CMD_DISC), then close the socket."""
        try:
            self.sock.sendall(p.encode_request(p.Command.DISC, 0))
        except OSError:
            pass
        finally:
            self.sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _recv(self, n: int) -> bytes:
        buffer = bytearray(n)
        view = memoryview(buffer)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionError(f"server closed the connection ({got} of {n} bytes received)")
            got += k
        return bytes(buffer)
