// gzip through the system zlib (CZlib): a streaming reader that never produces more than its caller asks
// for (so a gzip bomb cannot make it allocate), and a streaming writer. Used by NIfTI.swift for .nii.gz.
//
// Reading follows Python's gzip module, which nibabel uses: members are concatenated (a file may hold
// several gzip members back to back), NUL bytes between and after members are padding, and anything
// else after a member is an error. Each member's CRC-32 and length are checked by zlib when its end is
// reached.
import CZlib

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The two bytes every gzip member starts with.
let gzipMagic: (UInt8, UInt8) = (0x1F, 0x8B)

/// zlib's windowBits for "gzip wrapper, 32 KB window".
private let gzipWindowBits: Int32 = 15 + 16

/// Inflates a gzip file held in memory, on demand: `read(into:count:)` produces at most `count` bytes.
/// Errors are DeformUXError.io naming `what` and `path`.
final class GzipReader {
    private let input: [UInt8]
    private var position = 0           // bytes of `input` consumed by zlib
    private var stream = z_stream()
    private var initialised = false
    /// The current member ended (Z_STREAM_END) and the next one has not been started.
    private var memberEnded = false
    /// No more members: everything after the last one was NUL padding (or nothing).
    private(set) var finished = false
    /// Decompressed bytes produced so far.
    private(set) var produced = 0
    private let what: String
    private let path: String

    init(_ input: [UInt8], what: String, path: String) throws {
        self.input = input
        self.what = what
        self.path = path
        let status = inflateInit2_(&stream, gzipWindowBits, zlibVersion(), Int32(MemoryLayout<z_stream>.size))
        guard status == Z_OK else {
            if status == Z_MEM_ERROR { throw DeformUXError.outOfMemory(what, "zlib could not allocate its inflate state") }
            throw DeformUXError.internal(what, "zlib inflateInit2 failed with status \(status)")
        }
        initialised = true
    }

    deinit {
        if initialised { inflateEnd(&stream) }
    }

    /// Decompresses up to `count` bytes into `destination`; returns how many came (fewer only at the end
    /// of the last member, or of the current one with `stopAtMemberEnd`).
    func read(into destination: UnsafeMutableRawPointer, count: Int, stopAtMemberEnd: Bool = false) throws -> Int {
        var done = 0
        while done < count && !finished {
            if memberEnded {
                if stopAtMemberEnd { break }
                // Skip NUL padding; another member must start with the gzip magic.
                while position < input.count && input[position] == 0 { position += 1 }
                if position == input.count { finished = true; break }
                guard position + 1 < input.count, input[position] == gzipMagic.0, input[position + 1] == gzipMagic.1 else {
                    throw DeformUXError.io(what, "unexpected bytes after gzip member at compressed offset \(position) (not gzip data)",
                                           path: path)
                }
                guard inflateReset(&stream) == Z_OK else { throw DeformUXError.internal(what, "zlib inflateReset failed") }
                memberEnded = false
            }
            // zlib counts in UInt32: feed and drain at most 1 GB per call.
            let inChunk = min(input.count - position, 1 << 30)
            let outChunk = min(count - done, 1 << 30)
            let (status, consumed, made) = input.withUnsafeBufferPointer { b -> (Int32, Int, Int) in
                stream.next_in = UnsafeMutablePointer(mutating: b.baseAddress.map { $0 + position })
                stream.avail_in = UInt32(inChunk)
                stream.next_out = (destination + done).assumingMemoryBound(to: Bytef.self)
                stream.avail_out = UInt32(outChunk)
                let s = inflate(&stream, Z_NO_FLUSH)
                let consumed = inChunk - Int(stream.avail_in)
                let made = outChunk - Int(stream.avail_out)
                stream.next_in = nil
                stream.next_out = nil
                return (s, consumed, made)
            }
            position += consumed
            done += made
            produced += made
            switch status {
            case Z_OK:
                continue
            case Z_STREAM_END:
                memberEnded = true
            case Z_BUF_ERROR:
                // No progress possible: the input ran out inside a member.
                if position >= input.count {
                    throw DeformUXError.io(what, "the gzip stream is truncated: it ends inside a member after \(produced) decompressed bytes",
                                           path: path)
                }
                if made == 0 && consumed == 0 {
                    throw DeformUXError.internal(what, "zlib made no progress at compressed offset \(position)")
                }
            case Z_MEM_ERROR:
                throw DeformUXError.outOfMemory(what, "zlib ran out of memory while decompressing")
            default:  // Z_DATA_ERROR (corrupt deflate data, bad header, CRC or length mismatch), Z_NEED_DICT
                let reason = stream.msg.map { String(cString: $0) } ?? "status \(status)"
                throw DeformUXError.io(what, "the gzip data is damaged (zlib: \(reason)) after \(produced) decompressed bytes",
                                       path: path)
            }
        }
        return done
    }

    /// Reads on past what the caller needs, at most `limit` more bytes, to reach the end of the current
    /// member so that zlib checks its CRC-32 and length. Returns without error if the limit is reached
    /// first; what follows the member is not looked at (nibabel reads no further than the data either).
    func verifyEnd(limit: Int) throws {
        var scratch = [UInt8](repeating: 0, count: min(limit, 1 << 16))
        var left = limit
        while left > 0 && !finished && !memberEnded {
            let n = try scratch.withUnsafeMutableBytes { b -> Int in
                guard let base = b.baseAddress else { return 0 }
                return try read(into: base, count: min(left, b.count), stopAtMemberEnd: true)
            }
            if n == 0 { break }
            left -= n
        }
    }
}

/// Deflates into a file descriptor with the gzip wrapper, chunk by chunk.
final class GzipWriter {
    private var stream = z_stream()
    private var initialised = false
    private var output = [UInt8](repeating: 0, count: 1 << 18)
    private let fd: Int32
    private let what: String
    private let path: String

    /// `level` 0 (store) ... 9 (smallest); nibabel writes .nii.gz with level 1.
    init(fd: Int32, level: Int32, what: String, path: String) throws {
        self.fd = fd
        self.what = what
        self.path = path
        guard (0...9).contains(level) else {
            throw DeformUXError.invalidArgument(what, "gzip compression level must be 0...9, got \(level)")
        }
        let status = deflateInit2_(&stream, level, Z_DEFLATED, gzipWindowBits, 8, Z_DEFAULT_STRATEGY,
                                   zlibVersion(), Int32(MemoryLayout<z_stream>.size))
        guard status == Z_OK else {
            if status == Z_MEM_ERROR { throw DeformUXError.outOfMemory(what, "zlib could not allocate its deflate state") }
            throw DeformUXError.internal(what, "zlib deflateInit2 failed with status \(status)")
        }
        initialised = true
    }

    deinit {
        if initialised { deflateEnd(&stream) }
    }

    /// Compresses `bytes` and writes what zlib hands back.
    func write(_ bytes: UnsafeRawBufferPointer) throws {
        guard let base = bytes.baseAddress else { return }
        var offset = 0
        while offset < bytes.count {
            let chunk = min(bytes.count - offset, 1 << 30)
            stream.next_in = UnsafeMutablePointer(mutating: (base + offset).assumingMemoryBound(to: Bytef.self))
            stream.avail_in = UInt32(chunk)
            try drain(flush: Z_NO_FLUSH)
            offset += chunk
        }
        stream.next_in = nil
    }

    /// Flushes the deflate stream and writes the gzip trailer.
    func finish() throws {
        stream.next_in = nil
        stream.avail_in = 0
        try drain(flush: Z_FINISH)
    }

    private func drain(flush: Int32) throws {
        while true {
            let (status, have) = output.withUnsafeMutableBytes { b -> (Int32, Int) in
                stream.next_out = b.baseAddress?.assumingMemoryBound(to: Bytef.self)
                stream.avail_out = UInt32(b.count)
                let s = deflate(&stream, flush)
                let have = b.count - Int(stream.avail_out)
                stream.next_out = nil
                return (s, have)
            }
            guard status == Z_OK || status == Z_STREAM_END || status == Z_BUF_ERROR else {
                throw DeformUXError.internal(what, "zlib deflate failed with status \(status)")
            }
            if have > 0 {
                try output.withUnsafeBytes { try writeAll(fd, UnsafeRawBufferPointer(rebasing: $0[0..<have]), what: what, path: path) }
            }
            if flush == Z_FINISH {
                if status == Z_STREAM_END { return }
            } else if stream.avail_in == 0 && have < output.count {
                return
            }
        }
    }
}

/// write(2) until every byte is written (retrying on EINTR and short writes).
func writeAll(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, what: String, path: String) throws {
    guard var p = buffer.baseAddress else { return }
    var left = buffer.count
    while left > 0 {
        let w = systemWrite(fd, p, left)
        if w < 0 {
            let e = errno
            if e == EINTR { continue }
            throw DeformUXError.io(what, "write failed: \(String(cString: strerror(e)))", path: path, errno: e)
        }
        p += w
        left -= w
    }
}

/// libc's write(2), named apart from the `write` functions of the IO types.
func systemWrite(_ fd: Int32, _ p: UnsafeRawPointer, _ n: Int) -> Int {
    write(fd, p, n)
}
